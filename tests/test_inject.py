"""Tests of planar3d.data.inject."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from planar3d.data.inject import EDGE_RAMP_MM, LESION_CONTRAST, head_mask, inject_lesions, lesion_masks_from_folder, white_matter_level
from planar3d.data.phantom import make_phantom_parts
from planar3d.errors import InputError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mslub_mni"


@pytest.fixture(scope="module")
def host():
    p = make_phantom_parts(np.random.default_rng(11), size="small", lesion_load=0.002)
    masks = []
    for center in [(30, 28, 26), (36, 36, 22)]:
        m = np.zeros(p.flair.shape, np.uint8)
        m[tuple(slice(c - 2, c + 2) for c in center)] = 1
        masks.append(m)
    return p, masks


def test_label_is_union_and_outside_unchanged(host):
    p, masks = host
    flair, label = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(1), host_label=p.lesions)
    union = (masks[0] | masks[1] | p.lesions).astype(np.uint8)
    np.testing.assert_array_equal(label, union)
    assert label.dtype == np.uint8
    injected = (masks[0] | masks[1]) > 0
    np.testing.assert_array_equal(flair[~injected], p.flair[~injected])
    assert np.all(flair[injected] >= p.flair[injected])
    assert flair[injected].mean() > 1.2 * p.flair[injected].mean()


def test_auto_intensity_from_white_matter(host):
    p, masks = host
    flair, label = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(2))
    wm, _ = white_matter_level(p.flair)
    assert abs(wm - p.info["wm_level"]) < 0.15 * p.info["wm_level"]
    core = np.zeros_like(label, bool)
    core[29:31, 27:29, 25:27] = True
    assert 1.2 * wm < flair[core].mean() < 2.0 * wm
    np.testing.assert_array_equal(flair[label == 0], p.flair[label == 0])


def test_contrast_sets_the_range_of_the_drawn_level(host):
    """The lesion level is ``contrast`` times white matter; the default range is LESION_CONTRAST,
    drawn exactly as the same range given explicitly; a range outside 0 < low <= high is refused."""
    p, masks = host
    wm, _ = white_matter_level(p.flair)
    core = np.zeros(p.flair.shape, bool)
    core[29:31, 27:29, 25:27] = True
    low_flair, _ = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(5), contrast=(1.1, 1.1))
    high_flair, _ = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(5), contrast=(2.2, 2.2))
    assert 0.95 * 1.1 * wm < low_flair[core].mean() < 1.05 * 1.1 * wm
    assert 0.95 * 2.2 * wm < high_flair[core].mean() < 1.05 * 2.2 * wm
    # the default range is LESION_CONTRAST, drawn exactly as an explicit (1.3, 1.8)
    default, _ = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(6))
    explicit, _ = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(6), contrast=LESION_CONTRAST)
    assert LESION_CONTRAST == (1.3, 1.8)
    np.testing.assert_array_equal(default, explicit)
    for bad in [(1.8, 1.3), (0.0, 1.5), (-1.0, 1.0)]:
        with pytest.raises(ValueError, match="0 < low <= high"):
            inject_lesions(p.flair, p.affine, masks, np.random.default_rng(0), contrast=bad)


def test_edge_contrast_grades_the_lesion_from_its_edge(host):
    """A graded lesion: its label and the voxels outside it do not change; its outermost voxels
    get the edge's share of the flat lesion's contrast, the share rises with depth, and full
    contrast at the edge (1.0) is exactly the flat lesion; out-of-range shares are refused."""
    p, masks = host
    flat, flat_label = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(7))
    graded, label = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(7), edge_contrast=0.25)
    np.testing.assert_array_equal(label, flat_label)
    np.testing.assert_array_equal(graded[label == 0], p.flair[label == 0])
    full, _ = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(7), edge_contrast=1.0)
    np.testing.assert_array_equal(full, flat)
    # the first mask is a 4-voxel cube at spacing p.affine: its corner voxel is on the edge
    spacing = np.sqrt((p.affine[:3, :3] ** 2).sum(axis=0))
    assert spacing.min() + EDGE_RAMP_MM > 1.0  # the cube's inner voxels lie on the ramp
    corner, inner = (28, 26, 24), (29, 27, 25)
    flat_excess = flat[corner] - p.flair[corner]
    assert flat_excess > 0
    assert graded[corner] - p.flair[corner] == pytest.approx(0.25 * flat_excess, rel=1e-5)
    ratio_corner = (graded[corner] - p.flair[corner]) / flat_excess
    ratio_inner = (graded[inner] - p.flair[inner]) / (flat[inner] - p.flair[inner])
    assert 0.25 < ratio_inner <= 1.0 and ratio_inner > ratio_corner
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"edge_contrast must be in \[0, 1\]"):
            inject_lesions(p.flair, p.affine, masks, np.random.default_rng(0), edge_contrast=bad)


def test_deterministic_per_seed(host):
    p, masks = host
    a = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(3))
    b = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(3))
    c = inject_lesions(p.flair, p.affine, masks, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_background_never_gets_lesions(host):
    p, _ = host
    mask = np.zeros(p.flair.shape, np.uint8)
    mask[:3, :3, :3] = 1  # air corner
    flair, label = inject_lesions(p.flair, p.affine, [mask], np.random.default_rng(0))
    assert label.sum() == 0
    np.testing.assert_array_equal(flair, p.flair)
    assert not head_mask(p.flair)[:3, :3, :3].any()


def test_shape_mismatch_raises(host):
    p, _ = host
    with pytest.raises(ValueError, match="shape"):
        inject_lesions(p.flair, p.affine, [np.zeros((3, 3, 3))], np.random.default_rng(0))


def test_masks_from_folder_resamples_through_affines(tmp_path, host):
    p, masks = host
    ras_affine = np.diag([3.3, 3.3, 3.3, 1.0])
    ras_affine[:3, 3] = -50
    nib.save(nib.Nifti1Image(masks[0], ras_affine), tmp_path / "a_lesions.nii.gz")
    # host on the same world grid but stored LAS (first axis flipped)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = masks[0].shape[0] - 1
    las_affine = ras_affine @ flip
    host_img = nib.Nifti1Image(p.flair[::-1].copy(), las_affine)
    (loaded,) = lesion_masks_from_folder(tmp_path, host_img)
    np.testing.assert_array_equal(loaded, masks[0][::-1])
    same = lesion_masks_from_folder(tmp_path, nib.Nifti1Image(p.flair, ras_affine))[0]
    np.testing.assert_array_equal(same, masks[0])


def test_masks_from_folder_errors(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="does not exist"):
        lesion_masks_from_folder(tmp_path / "nope", img)
    with pytest.raises(InputError, match="no .nii"):
        lesion_masks_from_folder(tmp_path, img)
    (tmp_path / "bad.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(InputError, match="bad.nii.gz"):
        lesion_masks_from_folder(tmp_path, img)


@pytest.mark.skipif(not (DATA / "patient26_flair.nii.gz").exists(), reason="shared MSLUB data absent")
def test_real_mslub_masks_into_patient26():
    host_img = nib.load(str(DATA / "patient26_flair.nii.gz"))
    flair = np.asarray(host_img.dataobj, dtype=np.float32)
    own = np.asarray(nib.load(str(DATA / "patient26_lesions.nii.gz")).dataobj) > 0
    folder = DATA / "lesion_masks"
    names = sorted(p.name for p in folder.glob("*.nii.gz"))[:2]
    masks = [np.asarray(nib.load(str(folder / n)).dataobj) > 0 for n in names]
    out, label = inject_lesions(flair, host_img.affine, masks, np.random.default_rng(0), host_label=own)
    brain = head_mask(flair)
    placed = (masks[0] | masks[1]) & brain
    np.testing.assert_array_equal(label > 0, placed | own)
    np.testing.assert_array_equal(out[~placed], flair[~placed])
    assert np.all(out[placed] >= flair[placed])
    new = placed & ~own
    assert out[new].mean() > flair[new].mean() * 1.1
