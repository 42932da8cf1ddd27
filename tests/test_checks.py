"""Tests of planar3d.data.checks: one bad case per kind of problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from planar3d.data.checks import check_case, check_manifest
from planar3d.data.manifest import Case, Manifest, hash_manifest


def _save(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _good(folder: Path, name: str) -> Case:
    image = _save(folder / f"{name}_flair.nii.gz", np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[1, 1, 1:3] = 1
    label = _save(folder / f"{name}_mask.nii.gz", mask)
    return Case(name, image, label)


def test_good_case(tmp_path):
    assert check_case(_good(tmp_path, "ok"), verify_hash=True) == []


def test_missing_files(tmp_path):
    case = Case("gone", tmp_path / "gone.nii.gz", tmp_path / "gone_mask.nii.gz")
    assert check_case(case, verify_hash=False) == [
        f"case gone: image {tmp_path / 'gone.nii.gz'}: file not found",
        f"case gone: label {tmp_path / 'gone_mask.nii.gz'}: file not found",
    ]
    assert check_case(case, verify_hash=True) == check_case(case, verify_hash=False)


def test_truncated_image(tmp_path):
    case = _good(tmp_path, "cut")
    _save(case.image, np.random.default_rng(0).random((30, 30, 30)))
    case.image.write_bytes(case.image.read_bytes()[:2000])
    (problem,) = check_case(case, verify_hash=False)
    assert problem.startswith(f"case cut: image {case.image}: not a readable NIfTI file")


def test_4d_image(tmp_path):
    case = _good(tmp_path, "dyn")
    _save(case.image, np.zeros((3, 4, 5, 2), np.float32))
    assert check_case(case, verify_hash=False) == [
        f"case dyn: image {case.image}: expected a 3D volume, got shape (3, 4, 5, 2)"
    ]


def test_nan_voxels(tmp_path):
    case = _good(tmp_path, "nan")
    data = np.ones((3, 4, 5), np.float32)
    data[0, 0, 0] = np.nan
    _save(case.image, data)
    assert check_case(case, verify_hash=False) == [f"case nan: image {case.image}: 1 voxels are NaN or infinite"]


def test_label_not_binary(tmp_path):
    case = _good(tmp_path, "multi")
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[0, 0, :3] = (1, 2, 4)
    _save(case.label, mask)
    assert check_case(case, verify_hash=False) == [
        f"case multi: label {case.label}: not binary (values found: 0, 1, 2, 4)"
    ]


def test_label_grid_differs(tmp_path):
    case = _good(tmp_path, "shape")
    _save(case.label, np.zeros((3, 4, 6), np.uint8))
    assert check_case(case, verify_hash=False) == [
        f"case shape: label {case.label}: shape (3, 4, 6) differs from the image's (3, 4, 5)"
    ]
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    _save(case.label, np.zeros((3, 4, 5), np.uint8), shifted)
    assert check_case(case, verify_hash=False) == [
        f"case shape: label {case.label}: affine differs from the image's by up to 0.5"
    ]
    shifted[0, 3] = 5e-5
    _save(case.label, np.zeros((3, 4, 5), np.uint8), shifted)
    assert check_case(case, verify_hash=False) == []


def test_checksum_mismatch_and_manifest(tmp_path):
    manifest = hash_manifest(Manifest("toy", tmp_path, [_good(tmp_path, "a"), _good(tmp_path, "b")]))
    assert check_manifest(manifest) == []
    mask = np.zeros((3, 4, 5), np.uint8)
    _save(manifest.case("b").label, mask)
    problems = check_manifest(manifest)
    assert len(problems) == 1
    assert problems[0].startswith(f"case b: label {manifest.case('b').label}: sha256 mismatch (expected ")
    assert check_manifest(manifest, verify_hashes=False) == []
    assert check_manifest(manifest, cases=[manifest.case("a")]) == []


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_label_types(tmp_path, dtype):
    case = _good(tmp_path, "typed")
    mask = np.zeros((3, 4, 5), dtype)
    mask[2, 2, 2] = 1
    _save(case.label, mask)
    assert check_case(case, verify_hash=False) == []
