"""Tests of planar3d.data.phantom."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from planar3d.data.phantom import make_phantom, make_phantom_parts, preset_geometry


@pytest.fixture(scope="module")
def small():
    return make_phantom_parts(np.random.default_rng(0), size="small", keep_tissues=True, lesion_load=0.01)


def test_tissue_ordering_on_noise_free_means(small):
    # The noise-free image is linear in the partial-volume fractions: recover each pure-tissue
    # intensity by least squares, then check the FLAIR ordering.
    names = ["skin", "fat", "muscle", "skull", "csf", "gm", "deep_gm", "wm"]
    columns = [small.tissues[n].ravel() for n in names] + [small.lesion_fraction.ravel()]
    pure, *_ = np.linalg.lstsq(np.stack(columns, 1).astype(np.float64), small.clean.ravel(), rcond=None)
    level = dict(zip(names + ["lesion"], pure))
    assert level["lesion"] > level["gm"] > level["wm"] > level["csf"] > level["skull"]
    assert level["fat"] > level["gm"]  # raw head: bright scalp fat
    np.testing.assert_allclose(level["wm"], small.info["wm_level"], rtol=1e-3)
    np.testing.assert_allclose(level["lesion"], small.info["lesion_level"], rtol=1e-3)
    # and on voxels that are mostly one tissue
    t = small.tissues
    cortex = (t["gm"] > 0.5) & (t["gm"] + t["wm"] > 0.99)  # grey matter mixed only with white
    assert small.clean[cortex].mean() > small.clean[t["wm"] > 0.95].mean()
    assert small.clean[small.tissues["wm"] > 0.95].mean() > small.clean[small.tissues["csf"] > 0.95].mean()


def test_label_is_binary_uint8_and_in_white_matter(small):
    assert small.lesions.dtype == np.uint8
    assert set(np.unique(small.lesions)) <= {0, 1}
    assert small.lesions.sum() > 0
    np.testing.assert_array_equal(small.lesions, (small.lesion_fraction >= 0.5).astype(np.uint8))
    white_before_lesions = small.tissues["wm"] + small.lesion_fraction
    assert np.all(white_before_lesions[small.lesions > 0] >= 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_lesion_load_within_bounds(seed):
    p = make_phantom_parts(np.random.default_rng(seed), size="small")
    load = p.lesions.sum() * np.prod(p.info["spacing"]) / p.info["brain_volume_mm3"]
    assert 0.0005 <= load <= 0.03
    assert 0.0005 <= p.info["lesion_volume_mm3"] / p.info["brain_volume_mm3"] <= 0.03


def test_lesions_are_many_components_of_spread_volumes():
    p = make_phantom_parts(np.random.default_rng(5), (96, 112, 80), (2.0, 2.0, 2.0), lesion_load=0.02)
    components, n = ndimage.label(p.lesions)  # 6-connectivity
    assert n > 5
    sizes = np.bincount(components.ravel())[1:]
    assert sizes.max() >= 5 * np.median(sizes)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS"])
def test_orientation_codes_and_world_anatomy(orientation):
    ref = make_phantom_parts(np.random.default_rng(2), size="small", noise=False, bias=False)
    p = make_phantom_parts(np.random.default_rng(2), size="small", orientation=orientation, noise=False, bias=False)
    assert nib.aff2axcodes(p.affine) == tuple(orientation)
    world = lambda ph: np.sort((ph.affine @ np.c_[np.argwhere(ph.lesions), np.ones(ph.lesions.sum())].T)[:3].T, axis=0)
    np.testing.assert_allclose(world(p), world(ref), atol=1e-6)
    ras = nib.as_closest_canonical(nib.Nifti1Image(p.clean, p.affine)).get_fdata()
    np.testing.assert_allclose(ras, ref.clean, rtol=0, atol=0)


def test_thick_slice_spacing_ranges():
    for seed in range(10):
        shape, spacing = preset_geometry("full", "thick", np.random.default_rng(seed))
        assert 0.7 <= spacing[0] == spacing[1] <= 1.0
        assert 3.0 <= spacing[2] <= 5.0
        assert 150 <= shape[2] * spacing[2] <= 190
    flair, lesions, affine = make_phantom(np.random.default_rng(0), size="small", geometry="thick", orientation="LPS")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    assert zooms[2] > 2 * zooms[0]
    assert flair.shape == lesions.shape and flair.shape[:2] == (64, 64)


def test_presets_and_dtypes():
    flair, lesions, affine = make_phantom(np.random.default_rng(0))
    assert flair.shape == (64, 64, 48) and flair.dtype == np.float32
    assert affine.shape == (4, 4)
    assert preset_geometry("full", "3d", np.random.default_rng(0)) == ((176, 208, 176), (1.0, 1.0, 1.0))


def test_deterministic_per_seed():
    a = make_phantom(np.random.default_rng(7))
    b = make_phantom(np.random.default_rng(7))
    c = make_phantom(np.random.default_rng(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_rician_noise_and_bias():
    p = make_phantom_parts(np.random.default_rng(3))
    background = p.flair[p.clean == 0]
    assert background.min() >= 0 and background.mean() > 0  # magnitude noise floor
    q = make_phantom_parts(np.random.default_rng(3), noise=False)
    ratio = q.flair[p.clean > 50] / p.clean[p.clean > 50]
    assert 1 / 1.2 - 1e-4 <= ratio.min() and ratio.max() <= 1.2 + 1e-4


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(rng, orientation="RAX")
    with pytest.raises(ValueError, match="shape and spacing"):
        make_phantom(rng, shape=(10, 10, 10))
    with pytest.raises(ValueError, match="size"):
        make_phantom(rng, size="huge")


def test_brain_extracted_is_the_raw_case_with_zero_outside_the_brain():
    raw = make_phantom_parts(np.random.default_rng(5), keep_tissues=True, bias=False)
    stripped = make_phantom_parts(np.random.default_rng(5), brain_extracted=True, bias=False)
    brain = raw.tissues["brain"] >= 0.5
    # Same random stream: identical anatomy, lesions and noise inside the brain.
    np.testing.assert_array_equal(stripped.lesions, raw.lesions)
    np.testing.assert_array_equal(stripped.flair[brain], raw.flair[brain])
    assert np.all(stripped.flair[~brain] == 0)
    assert np.all(stripped.lesions[~brain] == 0)
    assert stripped.info["brain_extracted"] and not raw.info["brain_extracted"]
