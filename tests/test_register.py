"""Tests of planar3d.data.register: a known shift between two scans of one phantom is recovered."""

import numpy as np
import pytest

from planar3d.data.inject import resample_to_host
from planar3d.data.phantom import make_phantom_parts
from planar3d.data.register import register_to_host, to_sitk


def test_to_sitk_places_voxels_like_nibabel():
    affine = np.array([[-0.9, 0, 0.1, 10], [0, 0, 3.0, -5], [0, 1.1, 0, 7], [0, 0, 0, 1]])
    image = to_sitk(np.zeros((4, 5, 6), np.float32), affine)
    assert image.GetSize() == (4, 5, 6)
    ras = affine @ np.array([1, 2, 3, 1.0])
    lps = image.TransformIndexToPhysicalPoint((1, 2, 3))
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)


@pytest.mark.parametrize("shift", [(6.0, -5.0, 4.0), (-5.0, 12.0, 90.0)])  # near, and far as in raw scanner space
def test_registration_recovers_a_shift_between_raw_host_and_stripped_template(shift):
    template = make_phantom_parts(np.random.default_rng(4), brain_extracted=True, bias=False)
    host = make_phantom_parts(np.random.default_rng(4))
    shift = np.array(shift)
    host_affine = host.affine.copy()
    host_affine[:3, 3] += shift  # the host's world is the template's moved by `shift`
    matrix = register_to_host(template.flair, template.affine, host.flair, host_affine)
    brain = np.argwhere(template.flair > 0)[::50]
    points = host_affine @ np.c_[brain, np.ones(len(brain))].T  # brain voxels in host world
    expected = template.affine @ np.c_[brain, np.ones(len(brain))].T
    error = np.linalg.norm((matrix @ points - expected)[:3], axis=0)
    assert np.median(error) < 1.0 and error.max() < 3.0  # mm, on ~3.3 mm voxels
    # and the template's brain mask resampled through it covers the host's brain
    brain_on_host = resample_to_host((template.flair > 0).astype(np.uint8), template.affine, _Image(host.flair.shape, host_affine), matrix)
    truth = template.flair > 0
    dice = 2 * (brain_on_host.astype(bool) & truth).sum() / (brain_on_host.sum() + truth.sum())
    assert dice > 0.9


def test_seed_zero_gives_the_same_matrix_every_time():
    """SimpleITK reads sampling seed 0 as "from the wall clock": it must not reach it."""
    template = make_phantom_parts(np.random.default_rng(4), brain_extracted=True, bias=False)
    host = make_phantom_parts(np.random.default_rng(5))
    first, again = (register_to_host(template.flair, template.affine, host.flair, host.affine, seed=0) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = register_to_host(template.flair, template.affine, host.flair, host.affine, seed=3)
    assert not np.array_equal(first, other)  # the seed does reach the sampling


def test_an_implausibly_scaled_fit_is_refused():
    from planar3d.data.register import check_plausible_scales

    fine = np.diag([1.25, 1.2, 1.29, 1.0])
    assert check_plausible_scales(fine) is fine
    with pytest.raises(ValueError, match="implausible fit: the host is scaled by 1.00, 1.00, 3.50"):
        check_plausible_scales(np.diag([1.0, 1.0, 3.5, 1.0]))


def test_brain_coverage_is_the_share_of_the_template_brain_inside_the_host():
    from planar3d.data.register import brain_coverage

    scale = np.diag([1.25, 1.25, 1.25, 1.0])  # the host's head is 0.8x the template's per axis
    # a 1000 ml template brain is 512 ml of host world; 256 ml of it inside the grid of 2 mm³ voxels
    assert brain_coverage(128_000, 2.0, 1_000_000.0, scale) == pytest.approx(0.5)
    assert brain_coverage(256_000, 2.0, 1_000_000.0, scale) == pytest.approx(1.0)


def test_registration_rejects_an_empty_template():
    with pytest.raises(ValueError, match="no foreground"):
        register_to_host(np.zeros((8, 8, 8)), np.eye(4), np.ones((8, 8, 8)), np.eye(4))


class _Image:
    """The two attributes of a nibabel image that resample_to_host reads."""

    def __init__(self, shape, affine):
        self.shape, self.affine = shape, affine
