"""Static checks of the container files; CI has no Docker engine.

scripts/container_check.sh builds and runs the image for real (needs root; docs/container.md
records its output). These tests keep the files it relies on consistent with the repository.
"""

import configparser
import importlib
import json
import os
import re
import shlex
import subprocess

import pytest

from conftest import PROJECT_ROOT

DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()
README = (PROJECT_ROOT / "README.md").read_text()
INSTALL = (PROJECT_ROOT / "scripts" / "install.sh").read_text()
CHECK = PROJECT_ROOT / "scripts" / "container_check.sh"
SBATCH = PROJECT_ROOT / "scripts" / "slurm" / "predict_parts.sbatch"
APPTAINER = (PROJECT_ROOT / "apptainer" / "planar3d.def").read_text()


def logical_lines(text):
    """Lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def instructions(name, stage=None):
    """Arguments of every ``name`` instruction (of one build stage when ``stage`` is given)."""
    found, current = [], None
    for line in logical_lines(DOCKERFILE):
        if line.startswith("FROM "):
            current = line.split()[-1] if " AS " in line else None
        if line.startswith(name + " ") and stage in (None, current):
            found.append(line.split(None, 1)[1])
    return found


def console_script():
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    command, target = setup["options.entry_points"]["console_scripts"].split("=")
    module, function = target.strip().split(":")
    return command.strip(), getattr(importlib.import_module(module), function)


def test_copied_paths_exist_and_are_not_ignored():
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    copies = [copy for copy in instructions("COPY") if not copy.startswith("--from=")]
    assert copies
    for copy in copies:
        *sources, _ = copy.split()
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
            assert source.rstrip("/") not in ignored


def test_entrypoint_is_the_console_command():
    command, main = console_script()
    assert json.loads(instructions("ENTRYPOINT")[0]) == [command]
    assert main.__module__ == "pipelines.cli"  # the front door sits above the library
    assert callable(main)


def test_builder_makes_the_wheel_and_runtime_installs_it_without_test_tools():
    assert instructions("FROM") == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    assert any("scripts/install.sh --wheel" in run for run in instructions("RUN", "builder"))
    runtime_runs = " ".join(instructions("RUN", "runtime"))
    assert "scripts/install.sh --runtime" in runtime_runs
    assert "! python -m pip show --quiet pytest" in runtime_runs  # the build fails if pytest got in
    assert "--from=builder /wheels/ /tmp/wheels/" in instructions("COPY", "runtime")


def test_install_script_pins_build_tools_and_keeps_tests_out_of_the_runtime_mode():
    assert "--upgrade" not in INSTALL
    assert "python -m pip install --quiet -c constraints.txt pip setuptools wheel" in INSTALL
    pins = dict(line.split("==") for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {"pip", "setuptools", "wheel"} <= set(pins)
    runtime = INSTALL.split("--runtime)")[1].split(";;")[0]
    assert "-c constraints.txt" in runtime and "[test]" not in runtime and "[onnx,bundle]" in runtime
    assert "bash scripts/install.sh\n" in (PROJECT_ROOT / ".ci" / "run").read_text()  # CI: the default mode


def test_base_image_default_is_the_cuda_image_of_the_pinned_torch():
    (arg,) = instructions("ARG")
    name, tag = arg.split("=", 1)[1].split(":")
    torch_pin = re.search(r"^torch==(\S+)$", (PROJECT_ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert name == "pytorch/pytorch" and re.fullmatch(rf"{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime", tag)


def test_runs_for_any_user_without_a_passwd_entry():
    user = instructions("USER")
    assert user and user[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(instructions("RUN"))
    assert "useradd" not in runs and "adduser" not in runs  # uid 1000 is taken on Ubuntu 24.04
    env = " ".join(instructions("ENV", "runtime"))
    for variable in ("HOME=", "USER=", "LOGNAME=", "MPLCONFIGDIR=", "TORCH_HOME="):
        assert variable in env
    assert 'chmod 1777 "$HOME" /output "$TORCH_HOME"' in " ".join(instructions("RUN", "runtime"))
    # Without -v, outputs stay in the container instead of an anonymous volume nobody finds.
    assert not instructions("VOLUME")


def docker_runs(text):
    return [line for line in logical_lines(text) if re.match(r"\s*(\S+=\S+ )*docker run ", line) or
            re.search(r"\bcontainer -v ", line)]


def test_readme_container_commands_give_outputs_to_the_host_user_with_read_only_inputs():
    runs = docker_runs(README.split("## Container")[1].split("\n## ")[0])
    assert len(runs) >= 3
    for run in runs:
        assert '--user "$(id -u):$(id -g)"' in run
        mounts = {}
        for volume in re.findall(r"-v (\S+)", run):
            _, target, *mode = volume.strip('"').split(":")
            mounts[target] = mode[0] if mode else "rw"
        assert mounts.get("/output") == "rw", run
        assert all(mode == "ro" for target, mode in mounts.items() if target != "/output"), run


def test_the_check_runs_the_readme_predict_command():
    # The check's predict line is the README's, with the check's folders and user.
    check = CHECK.read_text()
    assert 'container() { docker run --rm --user "$RUN_AS" "${BLAS_ENV[@]}" "$@"; }' in check
    assert re.search(r'container -v "\$WORK/data:/data:ro" -v "\$WORK/host/train:/model:ro" '
                     r'-v "\$WORK/container/predict:/output" \\\n\s+"\$IMAGE" predict -i /data/images -o /output --model /model',
                     check)
    assert "predict -i /data -o /output --model /model" in README


@pytest.mark.parametrize("script", [CHECK, SBATCH, PROJECT_ROOT / "scripts" / "install.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_slurm_script_shards_with_the_cli_options(capsys):
    text = SBATCH.read_text()
    assert "#SBATCH --array=0-" in text
    runs = [shlex.split(line.replace("${NV[@]+\"${NV[@]}\"}", "")) for line in logical_lines(text)
            if line.lstrip().startswith("exec ")]
    assert [words[:2] for words in runs] == [["exec", "planar3d"], ["exec", "apptainer"]] and "--nv" in text
    _, main = console_script()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = capsys.readouterr().out
    for words in runs:
        options = [word for word in words[words.index("predict") + 1:] if word.startswith("-")]
        for option in options:
            assert option in help_text, f"{option} is not an option of planar3d predict"
        assert {"--num-parts", "--part-id"} <= set(options)


@pytest.mark.parametrize("mode", ["host", "container", "container-cpu"])
def test_slurm_script_runs_planar3d_on_the_host_or_in_the_image(tmp_path, mode):
    """One array task with stand-ins for ``planar3d`` and ``apptainer`` that print their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("planar3d", "apptainer"):
        (bin_dir / name).write_text(f'#!/bin/sh\nprintf "%s\\n" {name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "masks"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_ARRAY_TASK_MIN": "0", **({} if mode == "host" else {"SIF": "planar3d.sif"}),
           **({"DEVICE": "cpu"} if mode == "container-cpu" else {})}
    done = subprocess.run(["bash", str(SBATCH), "/scans", str(out), "/runs/fold0"], env=env,
                          capture_output=True, text=True, check=True)
    parts = ["--num-parts", "4", "--part-id", "2"]
    if mode == "host":
        assert done.stdout.split() == ["planar3d", "predict", "-i", "/scans", "-o", str(out), "--model", "/runs/fold0",
                                       "--device", "auto", *parts]
        assert not out.exists()  # planar3d makes it, with its own checks
    else:
        device = "cpu" if mode == "container-cpu" else "auto"
        assert done.stdout.split() == [
            "apptainer", "run", *(["--nv"] if device == "auto" else []), "-B", "/scans:/data:ro",
            "-B", "/runs/fold0:/model:ro", "-B", f"{out}:/output", "planar3d.sif",
            "predict", "-i", "/data", "-o", "/output", "--model", "/model", "--device", device, *parts]
        assert out.is_dir()  # the bind mount's source


def test_slurm_script_refuses_an_array_not_starting_at_0(tmp_path):
    env = {"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2"}
    done = subprocess.run(["bash", str(SBATCH), "/scans", str(tmp_path / "out"), "/run"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "error: the array must start at 0 (got --array=1-2)\n"


def test_apptainer_definition_is_built_from_the_docker_image():
    header = dict(line.split(": ", 1) for line in APPTAINER.splitlines() if re.match(r"^(Bootstrap|From): ", line))
    assert header == {"Bootstrap": "docker-daemon", "From": "planar3d:latest"}
    assert 'exec planar3d "$@"' in APPTAINER
