"""Every command checks its output folder before any model loads, trains or runs.

The model given here is a file that is not a checkpoint (or no file at all): had the command
loaded it first, the error would be about the model, not the output folder.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from conftest import PROJECT_ROOT
from pipelines.config import load_config
from pipelines.evaluate import evaluate_folder
from pipelines.export import export_model
from pipelines.predict import predict_folder
from pipelines.rerun import rerun
from pipelines.train import train
from planar3d.errors import InputError


@pytest.fixture
def not_a_folder(tmp_path):
    path = tmp_path / "output"
    path.write_text("a file where the output folder should be")
    return path


@pytest.fixture
def not_a_model(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint")
    return path


def commands(tmp_path, not_a_model):
    """Each command with everything but its output folder, which is the argument."""
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scans / "flair.nii.gz")
    return {
        "predict": lambda out: predict_folder(scans, out, not_a_model, progress=False),
        "train": lambda out: train(tmp_path / "missing_manifest.json", 0, out, load_config("tiny")),
        "evaluate": lambda out: evaluate_folder(scans, ref_dir=scans, out_dir=out),
        "export": lambda out: export_model(not_a_model, "onnx", out / "model.onnx"),
        "rerun": lambda out: rerun(PROJECT_ROOT / "pipelines" / "experiments" / "synthetic_tiny.yaml", out),
    }


@pytest.mark.parametrize("command", ["predict", "train", "evaluate", "export", "rerun"])
def test_a_file_as_output_folder_fails_first(tmp_path, not_a_folder, not_a_model, command):
    with pytest.raises(InputError, match=r"output: output exists and is not a folder$"):
        commands(tmp_path, not_a_model)[command](not_a_folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["predict", "train", "evaluate", "export", "rerun"])
def test_a_read_only_output_folder_fails_first(tmp_path, not_a_model, command):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    try:
        with pytest.raises(InputError, match=r"read_only: output folder is not writable \(read-only or no permission\)$"):
            commands(tmp_path, not_a_model)[command](read_only)
    finally:
        read_only.chmod(0o755)
