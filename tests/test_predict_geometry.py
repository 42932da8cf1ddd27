"""Prediction keeps geometry exactly: the model replaced by an intensity threshold.

A fake network returns logits ``x - c``, so its mask must equal ``normalised intensity > c``
computed in the input's own voxel order (normalisation is voxel-wise, so reorienting to RAS and
back changes nothing). Volumes have oblique affines, RAS/LPS/LAS orientations, anisotropic voxels
and qform != sform with different codes; the mask's header must match the input's exactly.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from pipelines.predict import InferenceSettings, predict_folder, predict_scan, remove_small_components
from planar3d.checkpoint import ModelCheckpoint
from planar3d.networks import PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig, normalize_intensity
from tests.conftest import SHARED_DATA

CUT = 0.3  # normalised intensity above which the fake model says "lesion"


class ThresholdModel(nn.Module):
    """Logits ``x - c`` from the first channel: sigmoid > 0.5 exactly where ``x > c``."""

    def __init__(self, cut: float = CUT):
        super().__init__()
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - self.cut


META = ModelCheckpoint(state_dict={}, network=PlanarResUNetConfig(plane_axis=2, in_channels=1),
                       normalization=NormalizationConfig(), threshold=0.5, roi_size=(-1, -1, -1), overlap=0.25)


def _rotation(degrees: tuple) -> np.ndarray:
    a, b, c = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _affine(codes: str, spacing=(1.0, 1.0, 1.0), degrees=(0.0, 0.0, 0.0)) -> np.ndarray:
    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1)}[codes]
    affine = np.eye(4)
    affine[:3, :3] = _rotation(degrees) @ np.diag(np.array(signs) * np.array(spacing))
    affine[:3, 3] = (-20.5, 13.25, -7.0)
    return affine


CASES = {
    "ras_iso": dict(codes="RAS"),
    "lps_aniso": dict(codes="LPS", spacing=(0.7, 0.7, 4.0)),
    "las_aniso": dict(codes="LAS", spacing=(0.7, 0.7, 4.0)),
    "oblique_ras": dict(codes="RAS", spacing=(1.0, 1.2, 0.9), degrees=(12.0, -7.0, 25.0)),
    "oblique_lps_aniso": dict(codes="LPS", spacing=(0.7, 0.7, 4.0), degrees=(-15.0, 5.0, 40.0)),
    # a strongly oblique one whose nearest RAS axes are permuted
    "permuted_axes": dict(codes="LAS", spacing=(0.9, 1.1, 3.0), degrees=(0.0, 80.0, 10.0)),
}


def _head(shape, rng) -> np.ndarray:
    """A bright noisy ellipsoid on a dark background (an Otsu head), int16."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    data = rng.normal(20, 5, shape) + inside * rng.normal(400, 120, shape)
    return np.clip(data, 0, None).astype(np.int16)


def _write_scan(path, case: dict, shape=(14, 11, 9), seed=0, split_qform=True):
    rng = np.random.default_rng(seed)
    data = _head(shape, rng)
    affine = _affine(**case)
    image = nib.Nifti1Image(data, affine)
    if split_qform:  # qform != sform, with different codes
        q = affine.copy()
        q[:3, 3] += (1.5, -2.0, 0.5)
        image.set_qform(q, code=1)
        image.set_sform(affine, code=2)
    nib.save(image, path)
    return path


def _expected(path, cut=CUT) -> np.ndarray:
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    normalised = normalize_intensity(data)  # the input's own voxel order
    return (torch.sigmoid(torch.from_numpy(normalised) - cut) > 0.5).numpy()


def assert_same_geometry(output: nib.Nifti1Image, reference: nib.Nifti1Image) -> None:
    assert output.shape == reference.shape
    np.testing.assert_array_equal(output.affine, reference.affine)
    for form in ("qform", "sform"):
        out_matrix, out_code = getattr(output.header, f"get_{form}")(coded=True)
        ref_matrix, ref_code = getattr(reference.header, f"get_{form}")(coded=True)
        assert int(out_code) == int(ref_code), form
        np.testing.assert_array_equal(out_matrix, ref_matrix)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units"):
        np.testing.assert_array_equal(output.header[key], reference.header[key], err_msg=key)
    np.testing.assert_array_equal(output.header.get_zooms()[:3], reference.header.get_zooms()[:3])
    assert nib.aff2axcodes(output.affine) == nib.aff2axcodes(reference.affine)


@pytest.mark.parametrize("name", sorted(CASES))
def test_threshold_model_mask_equals_thresholded_input(tmp_path, name):
    path = _write_scan(tmp_path / f"{name}.nii.gz", CASES[name])
    settings = InferenceSettings.from_checkpoint(META, min_lesion_size=0)
    result = predict_scan(ThresholdModel(), META, path, tmp_path / "mask.nii.gz", settings,
                          probability_path=tmp_path / "prob.nii.gz")
    assert result.status == "done" and set(result.timings) == {"load", "preprocess", "model", "postprocess", "write"}
    reference = nib.load(path)
    mask_image = nib.load(tmp_path / "mask.nii.gz")
    assert mask_image.get_data_dtype() == np.uint8
    mask = np.asarray(mask_image.dataobj)
    expected = _expected(path)
    assert 0 < expected.sum() < expected.size  # a real test: both classes present
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    assert_same_geometry(mask_image, reference)
    probability = nib.load(tmp_path / "prob.nii.gz")
    assert probability.get_data_dtype() == np.float32
    assert_same_geometry(probability, reference)
    np.testing.assert_array_equal(np.asarray(probability.dataobj) > 0.5, expected)


@pytest.mark.parametrize("name", ["lps_aniso", "oblique_lps_aniso"])
def test_small_components_removed_in_the_input_grid(tmp_path, name):
    """Component removal after reorientation equals removal in the input's own voxel order."""
    path = _write_scan(tmp_path / "scan.nii.gz", CASES[name], shape=(16, 13, 7), seed=3)
    settings = InferenceSettings.from_checkpoint(META, min_lesion_size=8.0)
    predict_scan(ThresholdModel(0.9), META, path, tmp_path / "mask.nii.gz", settings)
    spacing = nib.load(path).header.get_zooms()[:3]
    expected = remove_small_components(_expected(path, 0.9), spacing, 8.0)
    assert expected.sum() < _expected(path, 0.9).sum()  # something was removed
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj), expected.astype(np.uint8))


def test_slabs_with_overlap_match_the_threshold_away_from_the_cut(tmp_path):
    """Gaussian-blended slabs of a pointwise model give the same mask (up to rounding at the cut)."""
    path = _write_scan(tmp_path / "scan.nii.gz", CASES["oblique_lps_aniso"], shape=(12, 10, 21))
    settings = InferenceSettings.from_checkpoint(META, roi_size=(-1, -1, 8), overlap=0.5, min_lesion_size=0)
    predict_scan(ThresholdModel(), META, path, tmp_path / "mask.nii.gz", settings)
    data = normalize_intensity(np.asarray(nib.load(path).dataobj, dtype=np.float32))
    clear = np.abs(data - CUT) > 1e-4
    mask = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj).astype(bool)
    np.testing.assert_array_equal(mask[clear], _expected(path)[clear])


@pytest.mark.skipif(not (SHARED_DATA / "real").is_dir(), reason="../shared/data/real not available")
def test_real_network_on_real_scans_keeps_geometry(tmp_path):
    """A tiny random-weight PlanarResUNet checkpoint through the whole pipeline on each real scan."""
    from planar3d.networks import PlanarResUNet

    scans = sorted((SHARED_DATA / "real").glob("*.nii.gz"))
    if not scans:
        pytest.skip("no real scans")
    config = PlanarResUNetConfig(width=0.0625)
    torch.manual_seed(0)
    network = PlanarResUNet(config)
    ModelCheckpoint(network.state_dict(), config).save(tmp_path / "run" / "best.pt")
    summary = predict_folder(SHARED_DATA / "real", tmp_path / "out", tmp_path / "run",
                             roi_size=(-1, -1, -1), overlap=0.0, progress=False)
    assert len(summary.done) == len(scans) and not summary.failed
    for scan in scans:
        mask_path = tmp_path / "out" / scan.name.replace(".nii.gz", "_mask.nii.gz")
        mask = nib.load(mask_path)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert_same_geometry(mask, nib.load(scan))
