"""Export: TorchScript and ONNX compute what the network computes; the MONAI bundle writes what
``planar3d predict`` writes."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from planar3d.checkpoint import ModelCheckpoint, load_model
from pipelines.cli import app
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    config = PlanarResUNetConfig(width=0.0625, norm="instance")
    net = PlanarResUNet(config)
    run = tmp_path / "run"
    ModelCheckpoint(net.state_dict(), config, NormalizationConfig(), threshold=0.5).save(run / "best.pt")
    return run


def test_torchscript_export_equals_the_network_on_any_size(run_dir):
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    extra = {"planar3d.json": ""}
    scripted = torch.jit.load(str(run_dir / "export" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["planar3d.json"])["threshold"] == 0.5
    model, _ = load_model(run_dir / "best.pt")
    x = torch.randn(1, 1, 21, 18, 11)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)


def test_onnx_export_equals_the_network_on_another_size(run_dir):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(run_dir / "export" / "model.onnx"))
    model, _ = load_model(run_dir / "best.pt")
    x = torch.randn(2, 1, 40, 36, 17)
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.abs(logits - model(x).numpy()).max() < 1e-4


def test_unknown_format_is_refused(run_dir):
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "tflite"])
    assert result.exit_code == 1 and "torchscript, onnx, bundle" in result.output


def test_monai_bundle_run_gives_the_masks_of_planar3d_predict(run_dir, tmp_path):
    pytest.importorskip("fire")
    from planar3d.data.phantom import make_phantom
    from pipelines.predict import predict_folder

    scans = tmp_path / "scans"
    scans.mkdir()
    flair, _, affine = make_phantom(np.random.default_rng(0), size="small", orientation="LPS")
    nib.save(nib.Nifti1Image(flair, affine), scans / "a.nii.gz")
    predict_folder(scans, tmp_path / "predicted", run_dir, progress=False)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "bundle"])
    assert result.exit_code == 0, result.output
    bundle = run_dir / "export" / "bundle"
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (bundle / name).is_file()
    # the bundle carries no code: it imports the installed planar3d distribution's packages (and torch)
    import importlib.util

    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    modules = [line.split()[1] for line in inference["imports"]] + [inference["network_def"]["_target_"].rsplit(".", 1)[0]]
    assert {module.split(".")[0] for module in modules} <= {"torch", "planar3d", "pipelines"}
    for module in modules:
        origin = importlib.util.find_spec(module).origin
        assert bundle.resolve() not in Path(origin).resolve().parents, module
    assert not list(bundle.rglob("*.py"))
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--meta_file", "configs/metadata.json", "--bundle_root", ".", "--input_dir", str(scans),
         "--output_dir", str(tmp_path / "bundled")],
        cwd=bundle, check=True, capture_output=True,
    )
    from_bundle = nib.load(tmp_path / "bundled" / "a_mask.nii.gz")
    from_predict = nib.load(tmp_path / "predicted" / "a_mask.nii.gz")
    assert np.array_equal(np.asanyarray(from_bundle.dataobj), np.asanyarray(from_predict.dataobj))
    assert np.array_equal(from_bundle.affine, from_predict.affine)
