"""The Dockerfile cannot be built here (no Docker engine): check what can be checked statically."""

import configparser
import json
import re

from conftest import PROJECT_ROOT

DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()


def instructions(name):
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_copied_paths_exist():
    copies = instructions("COPY")
    assert copies
    for copy in copies:
        *sources, _ = copy.split()
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repo"


def test_entrypoint_is_the_console_command():
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    command = scripts.split("=")[0].strip()
    assert json.loads(instructions("ENTRYPOINT")[0]) == [command]
    assert scripts.split("=")[1].strip() == "pipelines.cli:main"
    from pipelines.cli import main  # the entry point exists

    assert callable(main)


def test_installs_with_the_shared_script_as_a_non_root_user_with_volumes():
    assert any("scripts/install.sh" in run for run in instructions("RUN"))
    assert "scripts/install.sh" in (PROJECT_ROOT / ".ci" / "run").read_text()
    assert instructions("USER") and instructions("USER")[0].strip() not in ("root", "0")
    assert json.loads(instructions("VOLUME")[0]) == ["/data", "/output"]
    assert re.search(r"FROM \$\{BASE_IMAGE\}", DOCKERFILE)
    assert "cuda" in instructions("ARG")[0]


def test_dockerignore_keeps_what_the_image_copies():
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    for copy in instructions("COPY"):
        for source in copy.split()[:-1]:
            assert source.rstrip("/") not in ignored
