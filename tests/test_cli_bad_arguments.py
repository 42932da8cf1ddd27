"""Every subcommand, given bad arguments, exits 1 (a problem with the input, one line
``error: ...``) or 2 (bad usage) and never shows a traceback.

Runs in-process with typer's ``CliRunner``: only argument checking and the first library call
run, so the whole table takes seconds.
"""

from __future__ import annotations

import traceback

import numpy as np
import nibabel as nib
import pytest
from typer.testing import CliRunner

from pipelines.cli import app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A text file, a folder, a small NIfTI scan and a manifest pointing at missing files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text.txt").write_text("not a model\n")
    (root / "folder").mkdir()
    data = np.random.default_rng(0).normal(100, 20, (8, 8, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "folder" / "scan.nii.gz")
    (root / "manifest.json").write_text('{"format": "planar3d-manifest/1", "dataset": "x", "root": ".", '
                                        '"cases": [{"id": "a", "image": "missing.nii.gz", "label": "missing_l.nii.gz"}], '
                                        '"folds": [["a"]]}')
    (root / "experiment.yaml").write_text("name: x\nnot_a_key: 1\n")
    return root


def _cases():
    """``(name, argv with {root} placeholders)``."""
    return [
        # inflate
        ("inflate in-channels 2", ["inflate", "--vgg16", "none", "--out", "{root}/o/e.pt", "--in-channels", "2"]),
        ("inflate i3d-depth 0", ["inflate", "--vgg16", "none", "--out", "{root}/o/e.pt", "--mode", "i3d", "--i3d-depth", "0"]),
        ("inflate mode", ["inflate", "--vgg16", "none", "--out", "{root}/o/e.pt", "--mode", "cubic"]),
        ("inflate plane axis", ["inflate", "--vgg16", "none", "--out", "{root}/o/e.pt", "--plane-axis", "3"]),
        ("inflate text weights", ["inflate", "--vgg16", "{root}/text.txt", "--out", "{root}/o/e.pt"]),
        ("inflate out is a folder", ["inflate", "--vgg16", "none", "--out", "{root}/folder"]),
        ("inflate no args", ["inflate"]),
        # synth
        ("synth size", ["synth", "--out", "{root}/s", "--cases", "1", "--size", "huge"]),
        ("synth geometry", ["synth", "--out", "{root}/s", "--cases", "1", "--geometry", "round"]),
        ("synth orientation", ["synth", "--out", "{root}/s", "--cases", "1", "--orientation", "XYZ"]),
        ("synth zero cases", ["synth", "--out", "{root}/s", "--cases", "0"]),
        ("synth out is a file", ["synth", "--out", "{root}/text.txt", "--cases", "1"]),
        ("synth missing host", ["synth", "--out", "{root}/s", "--cases", "1", "--host", "{root}/none.nii.gz",
                                "--lesion-masks", "{root}/folder"]),
        # manifest
        ("manifest build missing folder", ["manifest", "build", "{root}/nowhere", "--out", "{root}/m.json"]),
        ("manifest build layout", ["manifest", "build", "{root}/folder", "--out", "{root}/m.json", "--layout", "weird"]),
        ("manifest build out is a folder", ["manifest", "build", "{root}/folder", "--out", "{root}/folder"]),
        ("manifest merge text", ["manifest", "merge", "{root}/text.txt", "--out", "{root}/m.json"]),
        ("manifest hash missing", ["manifest", "hash", "{root}/none.json"]),
        ("manifest hash missing files", ["manifest", "hash", "{root}/manifest.json", "--out", "{root}/h.json"]),
        ("manifest verify text", ["manifest", "verify", "{root}/text.txt"]),
        ("manifest check missing files", ["manifest", "check", "{root}/manifest.json"]),
        ("manifest check fold", ["manifest", "check", "{root}/manifest.json", "--fold", "7"]),
        ("manifest no subcommand", ["manifest", "frobnicate"]),
        # train
        ("train missing manifest", ["train", "--manifest", "{root}/none.json", "--fold", "0", "--out", "{root}/run"]),
        ("train text manifest", ["train", "--manifest", "{root}/text.txt", "--fold", "0", "--out", "{root}/run"]),
        ("train bad override", ["train", "--manifest", "{root}/manifest.json", "--fold", "0", "--out", "{root}/run",
                                "optim.epochs=ten"]),
        ("train unknown config", ["train", "--manifest", "{root}/manifest.json", "--fold", "0", "--out", "{root}/run",
                                  "--config", "nonsense"]),
        ("train out is a file", ["train", "--manifest", "{root}/manifest.json", "--fold", "0", "--out", "{root}/text.txt"]),
        ("train negative fold", ["train", "--manifest", "{root}/manifest.json", "--fold", "-1", "--out", "{root}/run"]),
        ("train check missing files", ["train", "--manifest", "{root}/manifest.json", "--fold", "0", "--out", "{root}/run", "--check"]),
        # predict
        ("predict text model", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt"]),
        ("predict missing model", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/none.pt"]),
        ("predict empty run folder", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/folder"]),
        ("predict out is a file", ["predict", "-i", "{root}/folder", "-o", "{root}/text.txt", "--model", "{root}/text.txt"]),
        ("predict missing input", ["predict", "-i", "{root}/none", "-o", "{root}/p", "--model", "{root}/text.txt"]),
        ("predict input not nifti", ["predict", "-i", "{root}/text.txt", "-o", "{root}/p", "--model", "{root}/text.txt"]),
        ("predict fold without manifest", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt",
                                           "--fold", "0"]),
        ("predict device", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt", "--device", "tpu"]),
        ("predict precision", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt", "--precision", "fp16"]),
        ("predict roi", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt", "--roi-size", "a,b"]),
        ("predict part", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt",
                          "--num-parts", "2", "--part-id", "5"]),
        ("predict threshold type", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt",
                                    "--threshold", "high"]),
        ("predict layout", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt", "--layout", "flat"]),
        ("predict bids layout on plain names", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt",
                                                "--layout", "bids"]),
        ("predict pattern matches nothing", ["predict", "-i", "{root}/folder", "-o", "{root}/p", "--model", "{root}/text.txt",
                                             "--pattern", "*_FLAIR.nii.gz"]),
        # models
        ("models missing folder", ["models", "{root}/none", "--no-cache"]),
        # evaluate
        ("evaluate no reference", ["evaluate", "--pred", "{root}/folder"]),
        ("evaluate missing pred", ["evaluate", "--pred", "{root}/none", "--ref", "{root}/folder"]),
        ("evaluate pred is a file", ["evaluate", "--pred", "{root}/text.txt", "--ref", "{root}/folder"]),
        ("evaluate out is a file", ["evaluate", "--pred", "{root}/folder", "--ref", "{root}/folder", "--out", "{root}/text.txt"]),
        ("evaluate text manifest", ["evaluate", "--pred", "{root}/folder", "--manifest", "{root}/text.txt"]),
        ("evaluate root without manifest", ["evaluate", "--pred", "{root}/folder", "--ref", "{root}/folder", "--root", "{root}"]),
        # rerun
        ("rerun missing experiment", ["rerun", "{root}/none.yaml"]),
        ("rerun text experiment", ["rerun", "{root}/text.txt", "--out", "{root}/r"]),
        ("rerun unknown key", ["rerun", "{root}/experiment.yaml", "--out", "{root}/r"]),
        # export
        ("export text model", ["export", "{root}/text.txt", "--format", "torchscript"]),
        ("export missing run", ["export", "{root}/none", "--format", "onnx"]),
        ("export format", ["export", "{root}/text.txt", "--format", "tflite"]),
        ("export empty run folder", ["export", "{root}/folder", "--format", "bundle", "--out", "{root}/b"]),
        # demo
        ("demo too few cases", ["demo", "--out", "{root}/d", "--cases", "2"]),
        ("demo out is a file", ["demo", "--out", "{root}/text.txt"]),
        ("demo seed type", ["demo", "--out", "{root}/d", "--seed", "one"]),
        # the root command
        ("unknown command", ["frobnicate"]),
        ("unknown option", ["--frobnicate"]),
    ]


CASES = _cases()


def test_every_subcommand_is_covered():
    covered = {argv[0] for _, argv in CASES} | {argv[1] for _, argv in CASES if argv[0] == "manifest" and len(argv) > 1}
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    manifest_commands = {c.name for group in app.registered_groups for c in group.typer_instance.registered_commands}
    assert commands | {"manifest"} <= covered
    assert manifest_commands <= covered


@pytest.mark.parametrize("name,argv", CASES, ids=[name for name, _ in CASES])
def test_bad_arguments_exit_1_or_2_without_traceback(files, name, argv):
    args = [a.replace("{root}", str(files)) for a in argv]
    result = CliRunner().invoke(app, args)
    shown = result.output + "".join(traceback.format_exception(*result.exc_info)) if result.exception and not isinstance(
        result.exception, SystemExit) else result.output
    assert result.exit_code in (1, 2), f"{name}: exit {result.exit_code}\n{shown}"
    assert "Traceback" not in shown, f"{name}\n{shown}"
    if result.exit_code == 1:
        error_lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert error_lines, f"{name}: exit 1 without an 'error: ' line\n{result.output}"
