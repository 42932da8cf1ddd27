"""Tests of ``pipelines.predict`` and ``planar3d predict``: inputs, outputs, resume, shards, failures.

A tiny random-weight planar res-u-net (width 0.0625) saved as a ``planar3d-model/1`` checkpoint
runs on tiny volumes; the masks mean nothing, the files around them are what is tested.
"""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
from dataclasses import replace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pipelines.predict import (
    InferenceSettings, find_inputs, lesion_mask, predict_folder, predict_scan, remove_small_components, resolve_checkpoint, shard,
)
from pipelines.cli import app
from planar3d.checkpoint import ModelCheckpoint
from planar3d.errors import InputError, WeightsError
from planar3d.networks import PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig

SHAPE = (16, 12, 8)


def _scan(path, seed=0, shape=SHAPE, affine=None):
    rng = np.random.default_rng(seed)
    data = (rng.normal(20, 5, shape) + (rng.random(shape) > 0.4) * 400).clip(0).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run folder holding last.pt (no best.pt) of a tiny random network."""
    from planar3d.networks import PlanarResUNet

    config = PlanarResUNetConfig(width=0.0625)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    ModelCheckpoint(PlanarResUNet(config).state_dict(), config, NormalizationConfig(), threshold=0.5,
                    roi_size=None, overlap=0.25).save(run / "last.pt")
    return run


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "in"
    for index, relative in enumerate(["a/b/x.nii.gz", "a/y.nii", "z.nii.gz", "sub/w.nii.gz", "v.nii.gz"]):
        _scan(root / relative, seed=index)
    (root / "notes.txt").write_text("not a scan")
    return root


def _masks(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*_mask.nii.gz"))


def test_folder_outputs_mirror_inputs(folder, checkpoint, tmp_path):
    out = tmp_path / "out"
    summary = predict_folder(folder, out, checkpoint, save_probabilities=True, qc=True, progress=False)
    assert len(summary.done) == 5 and not summary.failed and not summary.skipped
    assert _masks(out) == ["a/b/x_mask.nii.gz", "a/y_mask.nii.gz", "sub/w_mask.nii.gz", "v_mask.nii.gz", "z_mask.nii.gz"]
    assert (out / "a/b/x_prob.nii.gz").is_file() and (out / "a/b/x_qc.png").is_file()
    mask = nib.load(out / "a/y_mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8 and mask.shape == SHAPE
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert nib.load(out / "a/b/x_prob.nii.gz").get_data_dtype() == np.float32
    record = json.loads((out / "predictions.json").read_text())
    assert record["counts"] == {"done": 5, "skipped": 0, "failed": 0}
    scan = record["scans"][0]
    assert set(scan) >= {"input", "output", "status", "seconds", "error", "timings"}
    assert set(scan["timings"]) == {"load", "preprocess", "model", "postprocess", "write"}
    assert "5 done, 0 skipped, 0 failed" in summary.text()


def test_single_file_and_checkpoint_file(folder, checkpoint, tmp_path):
    summary = predict_folder(folder / "a/b/x.nii.gz", tmp_path / "out", checkpoint / "last.pt", progress=False)
    assert len(summary.done) == 1
    assert _masks(tmp_path / "out") == ["x_mask.nii.gz"]


def test_output_folder_inside_input_is_not_an_input(folder, checkpoint):
    predict_folder(folder, folder / "preds", checkpoint, progress=False)
    again = predict_folder(folder, folder / "preds", checkpoint, progress=False)
    assert len(again.results) == 5 and len(again.skipped) == 5


def test_manifest_fold(folder, checkpoint, tmp_path):
    cases = [{"id": f"c{i}", "image": rel, "label": rel} for i, rel in enumerate(["a/b/x.nii.gz", "a/y.nii", "z.nii.gz", "v.nii.gz"])]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"format": "planar3d-manifest/1", "dataset": "t", "root": "elsewhere",
                                    "cases": cases, "folds": [["c0", "c2"], ["c1", "c3"]]}))
    summary = predict_folder(manifest, tmp_path / "out", checkpoint, fold=0, root=folder, progress=False)
    assert [r.status for r in summary.results] == ["done", "done"]
    assert _masks(tmp_path / "out") == ["a/b/x_mask.nii.gz", "z_mask.nii.gz"]
    everything = predict_folder(manifest, tmp_path / "out2", checkpoint, root=folder, progress=False)
    assert len(everything.done) == 4
    with pytest.raises(InputError, match="fold 5"):
        predict_folder(manifest, tmp_path / "out3", checkpoint, fold=5, root=folder, progress=False)


def test_fold_without_manifest_and_missing_inputs(folder, checkpoint, tmp_path):
    with pytest.raises(InputError, match="need a manifest"):
        find_inputs(folder, fold=0)
    with pytest.raises(InputError, match="no such file"):
        find_inputs(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scans"):
        find_inputs(tmp_path / "empty")
    with pytest.raises(WeightsError, match="neither best.pt nor last.pt"):
        resolve_checkpoint(tmp_path / "empty")
    assert resolve_checkpoint(checkpoint) == checkpoint / "last.pt"


def test_skip_existing_and_overwrite(folder, checkpoint, tmp_path):
    out = tmp_path / "out"
    predict_folder(folder, out, checkpoint, progress=False)
    stamp = (out / "z_mask.nii.gz").stat().st_mtime_ns
    (out / "v_mask.nii.gz").unlink()
    again = predict_folder(folder, out, checkpoint, progress=False)
    assert [r.status for r in again.results].count("skipped") == 4
    assert [r.input for r in again.done] == [str(folder / "v.nii.gz")]
    assert (out / "z_mask.nii.gz").stat().st_mtime_ns == stamp
    redo = predict_folder(folder, out, checkpoint, overwrite=True, progress=False)
    assert len(redo.done) == 5
    assert (out / "z_mask.nii.gz").stat().st_mtime_ns != stamp
    # asking for probabilities too: outputs are incomplete, so the scan is redone
    assert len(predict_folder(folder, out, checkpoint, save_probabilities=True, progress=False).done) == 5


def test_shards_partition_the_inputs(folder, checkpoint, tmp_path):
    assert shard(list(range(7)), 3, 1) == [1, 4]
    with pytest.raises(ValueError):
        shard([1], 2, 2)
    seen = []
    for part in range(3):
        summary = predict_folder(folder, tmp_path / "out", checkpoint, num_parts=3, part_id=part, progress=False)
        assert summary.part_path.name.startswith(f"part{part}of3-") and summary.summary_path.name == "predictions.json"
        seen += [r.input for r in summary.results]
    everything = [str(s.path) for s in find_inputs(folder)]
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen)) == 5
    assert len(_masks(tmp_path / "out")) == 5
    merged = json.loads((tmp_path / "out" / "predictions.json").read_text())  # every part, once each
    assert merged["counts"] == {"done": 5, "skipped": 0, "failed": 0}
    assert sorted(scan["input"] for scan in merged["scans"]) == sorted(everything)


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "mixed"
    _scan(root / "good1.nii.gz", 1)
    _scan(root / "good2.nii.gz", 2)
    raw = gzip.compress(nib.Nifti1Image(np.ones((30, 30, 30), np.float32), np.eye(4)).to_bytes())
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), root / "four_d.nii.gz")
    nan = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nan[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), root / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 7, np.int16), np.eye(4)), root / "constant.nii.gz")
    return root


def test_bad_scans_are_reported_and_others_finish(bad_folder, checkpoint, tmp_path):
    out = tmp_path / "out"
    summary = predict_folder(bad_folder, out, checkpoint, progress=False)
    status = {r.input.rsplit("/", 1)[1]: r for r in summary.results}
    assert {name for name, r in status.items() if r.status == "done"} == {"good1.nii.gz", "good2.nii.gz"}
    reasons = {"truncated.nii.gz": "not a readable", "four_d.nii.gz": "3D", "nan.nii.gz": "NaN", "constant.nii.gz": "constant"}
    for name, reason in reasons.items():
        assert status[name].status == "failed"
        assert name in status[name].error and reason in status[name].error, status[name].error
    assert _masks(out) == ["good1_mask.nii.gz", "good2_mask.nii.gz"]
    record = json.loads((out / "predictions.json").read_text())
    assert record["counts"] == {"done": 2, "skipped": 0, "failed": 4}
    assert "FAILED" in summary.text()


class FixedLogits(nn.Module):
    """Ignores the image and returns a given logit map (RAS order)."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.logits = torch.from_numpy(logits.astype(np.float32))

    def forward(self, x):
        return self.logits[None, None].expand(x.shape[0], 1, *self.logits.shape)


def test_min_lesion_size_exact(tmp_path):
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm³ voxels: 6 voxels = 3 mm³ (removed), 7 = 3.5 mm³ (kept)
    probability = np.zeros((20, 20, 6), np.float32)
    probability[1, 1:7, 1] = 0.9  # 6 voxels
    probability[5, 1:8, 1] = 0.8  # 7 voxels
    probability[9, 1:8, 1] = 0.4  # 7 voxels below the threshold
    probability[12:14, 12:14, 2:4] = 0.7  # 8 voxels
    probability[15, 15, 0] = probability[16, 16, 0] = probability[16, 15, 1] = 0.95  # diagonal only: 3 singletons
    mask = probability > 0.5
    kept = remove_small_components(mask, spacing, 3.0)
    expected = np.zeros_like(mask)
    expected[5, 1:8, 1] = True
    expected[12:14, 12:14, 2:4] = True
    np.testing.assert_array_equal(kept, expected)
    assert remove_small_components(mask, spacing, 0).sum() == mask.sum()
    # through the whole pipeline: a RAS scan with that spacing, the model giving those probabilities
    path = _scan(tmp_path / "s.nii.gz", shape=probability.shape, affine=np.diag([*spacing, 1.0]))
    logits = np.log(probability.clip(1e-6, 1 - 1e-6) / (1 - probability.clip(1e-6, 1 - 1e-6)))
    meta = ModelCheckpoint({}, PlanarResUNetConfig(plane_axis=2), threshold=0.5, roi_size=(-1, -1, -1))
    result = predict_scan(FixedLogits(logits), meta, path, tmp_path / "m.nii.gz")
    assert result.lesions == 2 and result.lesion_volume_mm3 == pytest.approx(15 * 0.5)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj), expected.astype(np.uint8))


def test_core_threshold_drops_unconfident_lesions_through_predict(tmp_path):
    probability = np.zeros((12, 12, 6), np.float32)
    probability[1:4, 1:4, 1:3] = 0.6
    probability[2, 2, 2] = 0.95          # a confident core
    probability[7:10, 7:10, 1:3] = 0.6   # no core
    mask, lesions = lesion_mask(probability, 0.5, (1.0, 1.0, 1.0), 0.0, core_threshold=0.9)
    assert lesions == 1 and mask[2, 2, 2] and not mask[8, 8, 2]
    assert lesion_mask(probability, 0.5, (1.0, 1.0, 1.0), 0.0)[1] == 2          # no core rule: both
    path = _scan(tmp_path / "s.nii.gz", shape=probability.shape, affine=np.eye(4))
    logits = np.log(probability.clip(1e-6, 1 - 1e-6) / (1 - probability.clip(1e-6, 1 - 1e-6)))
    meta = ModelCheckpoint({}, PlanarResUNetConfig(plane_axis=2), threshold=0.5, roi_size=(-1, -1, -1),
                           min_lesion_size=0.0, core_threshold=0.9)
    result = predict_scan(FixedLogits(logits), meta, path, tmp_path / "m.nii.gz")
    assert result.lesions == 1 and result.lesion_volume_mm3 == 18.0


def test_settings_from_checkpoint():
    meta = ModelCheckpoint({}, PlanarResUNetConfig(plane_axis=1, in_channels=3), threshold=0.3, roi_size=None, overlap=0.1)
    settings = InferenceSettings.from_checkpoint(meta, tta=True)
    assert settings.roi_size == (-1, -1, -1) and settings.overlap == 0.1
    # whole-plane slabs stored by training mean the whole-volume pass; a 3D window is kept
    assert InferenceSettings.from_checkpoint(replace(meta, roi_size=(-1, 32, -1))).roi_size == (-1, -1, -1)
    assert InferenceSettings.from_checkpoint(replace(meta, roi_size=(64, 64, 64))).roi_size == (64, 64, 64) and settings.threshold == 0.3
    assert settings.flip_axes == (0, 2) and settings.in_channels == 3
    overridden = InferenceSettings.from_checkpoint(meta, threshold=0.6, roi_size=(8, 8, 8), overlap=0.0)
    assert (overridden.threshold, overridden.roi_size, overridden.overlap) == (0.6, (8, 8, 8), 0.0)
    # the minimum lesion size: the checkpoint's (chosen on validation) unless given, 0 included
    assert settings.min_lesion_size == 3.0
    assert InferenceSettings.from_checkpoint(replace(meta, min_lesion_size=12.0)).min_lesion_size == 12.0
    assert InferenceSettings.from_checkpoint(replace(meta, min_lesion_size=12.0), min_lesion_size=0).min_lesion_size == 0.0
    with pytest.raises(ValueError, match="min_lesion_size"):
        InferenceSettings.from_checkpoint(meta, min_lesion_size=-2)
    # the core threshold likewise: none for a checkpoint without one, 0 (no effect) accepted
    assert settings.core_threshold is None
    assert InferenceSettings.from_checkpoint(replace(meta, core_threshold=0.8)).core_threshold == 0.8
    assert InferenceSettings.from_checkpoint(replace(meta, core_threshold=0.8), core_threshold=0).core_threshold == 0.0
    with pytest.raises(ValueError, match="core_threshold"):
        InferenceSettings.from_checkpoint(meta, core_threshold=1.0)
    with pytest.raises(ValueError, match="threshold"):
        InferenceSettings.from_checkpoint(meta, threshold=1.5)
    with pytest.raises(ValueError, match="roi_size"):
        InferenceSettings.from_checkpoint(meta, roi_size=(8, 8))


def test_cli(folder, bad_folder, checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "-i", str(folder), "-o", str(tmp_path / "out"), "--model", str(checkpoint),
                                 "--tta", "--threshold", "0.4", "--min-lesion-size", "0", "--roi-size", "-1,-1,8", "--overlap", "0"])
    assert result.exit_code == 0, result.output
    assert "5 done, 0 skipped, 0 failed" in result.output
    assert len(_masks(tmp_path / "out")) == 5
    result = runner.invoke(app, ["predict", "-i", str(bad_folder), "-o", str(tmp_path / "bad"), "--model", str(checkpoint)])
    assert result.exit_code == 1
    assert "truncated.nii.gz" in result.output and "4 of 6 scans failed" in result.output
    result = runner.invoke(app, ["predict", "-i", str(folder), "-o", str(tmp_path / "x"), "--model", str(tmp_path / "none.pt")])
    assert result.exit_code == 1 and "none.pt" in result.output
    result = runner.invoke(app, ["predict", "-i", str(folder), "-o", str(tmp_path / "x"), "--model", str(checkpoint),
                                 "--num-parts", "2", "--part-id", "2"])
    assert result.exit_code == 1 and "--part-id" in result.output


def test_the_record_says_how_the_model_ran_and_warns_of_instance_norm_slabs(tmp_path, monkeypatch):
    import planar3d.inference as inference
    from planar3d.networks import PlanarResUNet

    config = PlanarResUNetConfig(width=0.0625, norm="instance")
    torch.manual_seed(0)
    ModelCheckpoint(PlanarResUNet(config).state_dict(), config, NormalizationConfig(), threshold=0.5,
                    roi_size=None, overlap=0.25).save(tmp_path / "normed.pt")
    _scan(tmp_path / "in" / "long.nii.gz", shape=(32, 32, 48))  # instance norm needs > 1 voxel at the bottleneck
    whole = predict_folder(tmp_path / "in", tmp_path / "whole", tmp_path / "normed.pt", progress=False)
    record = json.loads((tmp_path / "whole" / "long_mask.json").read_text())
    assert whole.done and record["scan"]["model_passes"] == {"mode": "whole"} and record["scan"]["warnings"] == []
    monkeypatch.setattr(inference, "memory_budget_bytes", lambda device: 1)  # no memory: 16-plane slabs
    predict_folder(tmp_path / "in", tmp_path / "starved", tmp_path / "normed.pt", progress=False)
    record = json.loads((tmp_path / "starved" / "long_mask.json").read_text())
    assert record["scan"]["model_passes"]["mode"] == "slabs" and record["scan"]["model_passes"]["slabs"] == 3
    assert any("instance norm" in w and "3 slabs" in w for w in record["scan"]["warnings"])
