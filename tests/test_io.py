"""Tests of planar3d.io: geometry round trips, input errors, atomic writes."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from planar3d.errors import InputError
from planar3d.io import (
    atomic_write,
    atomic_write_text,
    current_umask,
    check_output_folder,
    load_image,
    read_volume,
    sha256_file,
    voxel_spacing,
    write_json,
    write_like,
)

SPACING = (0.7, 0.9, 3.0)


def _oblique() -> np.ndarray:
    angle = np.deg2rad(12.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = (-80.5, 20.25, -40.0)
    return affine


def _axes(signs: tuple[int, int, int]) -> np.ndarray:
    affine = np.diag([s * z for s, z in zip(signs, SPACING)] + [1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return affine


GEOMETRIES = {
    "RAS": (_axes((1, 1, 1)), None, 1, 1),
    "LPS": (_axes((-1, -1, 1)), None, 2, 2),
    "LAS": (_axes((-1, 1, 1)), None, 1, 0),
    # oblique sform, qform an axis-aligned affine, different codes
    "oblique": (_oblique(), _axes((-1, 1, 1)), 1, 2),
}


def _write_reference(path, sform, qform, qcode, scode) -> None:
    data = np.random.default_rng(0).normal(100, 20, (6, 5, 4)).astype(np.float32)
    image = nib.Nifti1Image(data, sform)
    image.header.set_qform(sform if qform is None else qform, code=qcode)
    image.header.set_sform(sform, code=scode)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_write_like_keeps_geometry(tmp_path, name):
    sform, qform, qcode, scode = GEOMETRIES[name]
    source = tmp_path / "flair.nii.gz"
    _write_reference(source, sform, qform, qcode, scode)
    data, reference = read_volume(source)
    mask = (data > 100).astype(np.uint8)
    target = tmp_path / "flair_mask.nii.gz"
    write_like(mask, reference, target)

    original = nib.load(source)
    written = nib.load(target)
    assert written.shape == original.shape
    np.testing.assert_array_equal(written.affine, original.affine)
    q_written, q_code = written.get_qform(coded=True)
    q_original, q_original_code = original.get_qform(coded=True)
    assert q_code == q_original_code == qcode
    if qcode:
        np.testing.assert_array_equal(q_written, q_original)
    s_written, s_code = written.get_sform(coded=True)
    s_original, s_original_code = original.get_sform(coded=True)
    assert s_code == s_original_code == scode
    if scode:
        np.testing.assert_array_equal(s_written, s_original)
    np.testing.assert_array_equal(written.header["pixdim"], original.header["pixdim"])
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)
    assert voxel_spacing(written) == voxel_spacing(original)
    assert voxel_spacing(written) == tuple(float(np.float32(z)) for z in SPACING)


def test_write_like_float_and_bool(tmp_path):
    source = tmp_path / "a.nii"
    _write_reference(source, *GEOMETRIES["RAS"])
    data, reference = read_volume(source)
    write_like(data / 1000, reference, tmp_path / "p.nii.gz", dtype=np.float32)
    np.testing.assert_array_equal(read_volume(tmp_path / "p.nii.gz")[0], data / 1000)
    write_like(data > 90, reference, tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "b.nii.gz", None)[0], (data > 90).astype(np.uint8))
    with pytest.raises(ValueError, match="fit"):
        write_like(data, reference, tmp_path / "c.nii.gz")


def test_write_like_shape_mismatch_leaves_nothing(tmp_path):
    source = tmp_path / "a.nii.gz"
    _write_reference(source, *GEOMETRIES["RAS"])
    _, reference = read_volume(source)
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="shape"):
        write_like(np.zeros((6, 5, 3), np.uint8), reference, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "mask.nii.gz"]


def test_squeezes_trailing_singleton(tmp_path):
    path = tmp_path / "vol4d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 1), np.int16), np.eye(4)), path)
    data, image = read_volume(path)
    assert data.shape == image.shape == (3, 4, 5)
    assert data.dtype == np.float32


def test_truncated_gzip(tmp_path):
    path = tmp_path / "truncated.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((20, 20, 20)), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(InputError, match="truncated.nii.gz"):
        load_image(path)


def test_not_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(b"this is not an image" * 30)
    with pytest.raises(InputError, match="notes.nii.gz"):
        load_image(path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="notes.txt"):
        load_image(text)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="absent.nii.gz: file not found"):
        read_volume(tmp_path / "absent.nii.gz")


def test_4d_image(tmp_path):
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=r"series.nii.gz: expected a 3D volume, got shape \(3, 4, 5, 2\)"):
        load_image(path)


def test_nan_voxels(tmp_path):
    path = tmp_path / "nan.nii.gz"
    data = np.zeros((3, 4, 5), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputError, match="nan.nii.gz: 4 voxels are NaN or infinite"):
        read_volume(path)


def test_degenerate_affine(tmp_path):
    path = tmp_path / "flat.nii"
    affine = np.eye(4)
    affine[2, 2] = 0
    header = nib.Nifti1Header()
    header.set_data_shape((2, 2, 2))
    header.set_sform(affine, code=2)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), None, header), path)
    with pytest.raises(InputError, match="flat.nii: affine is degenerate"):
        load_image(path)


def test_atomic_write_success(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "t.txt"]


def test_atomic_write_failure_keeps_target(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as stream:
            stream.write(b"partial")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new.bin") as stream:
            raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path, umask, mask, mode):
    # mkstemp creates 0600 files; outputs must be readable like any file the user creates.
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "t.txt", "x")
    with atomic_write(tmp_path / "b.bin") as stream:
        stream.write(b"x")
    write_like(np.zeros((2, 2, 2), np.uint8), nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)),
               tmp_path / "m.nii.gz")
    (tmp_path / "plain.txt").write_text("x")
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {"t.txt": mode, "b.bin": mode, "m.nii.gz": mode, "plain.txt": mode}


def test_check_output_folder_creates_and_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    assert check_output_folder(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_check_output_folder_refuses_a_file(tmp_path):
    path = tmp_path / "out.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"out.nii.gz: output exists and is not a folder$"):
        check_output_folder(path)
    # A folder under a file cannot be created, even by root.
    with pytest.raises(InputError, match=r"out.nii.gz/sub: output folder cannot be written: Not a directory$"):
        check_output_folder(path / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_folder_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    try:
        with pytest.raises(InputError, match=r"read_only: output folder is not writable \(read-only or no permission\)$"):
            check_output_folder(folder)
        with pytest.raises(InputError, match=r"read_only/new: output folder is not writable \(read-only or no permission\)$"):
            check_output_folder(folder / "new")
    finally:
        folder.chmod(0o755)


def test_sha256_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
