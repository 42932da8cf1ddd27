"""Ensemble averaging and threshold (planar3d.ensemble)."""

import numpy as np
import pytest

from planar3d.ensemble import (
    average_probabilities, check_member_conventions, ensemble_core_threshold, ensemble_min_lesion_size, ensemble_threshold,
)


def test_average_is_the_mean_and_float32():
    rng = np.random.default_rng(0)
    maps = [rng.random((3, 4, 5)).astype(np.float32) for _ in range(3)]
    mean = average_probabilities(maps)
    assert mean.dtype == np.float32 and mean.shape == (3, 4, 5)
    np.testing.assert_allclose(mean, (maps[0].astype(np.float64) + maps[1] + maps[2]) / 3, rtol=0, atol=1e-7)
    weighted = average_probabilities(maps[:2], weights=[3, 1])
    np.testing.assert_allclose(weighted, 0.75 * maps[0].astype(np.float64) + 0.25 * maps[1], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(average_probabilities([maps[0]]), maps[0])


def test_averaging_removes_a_false_positive_only_one_member_makes():
    a = np.zeros((6, 6, 6), np.float32)
    a[1:3, 1:3, 1:3] = 0.9   # lesion both see
    b = a.copy()
    a[4:6, 4:6, 4:6] = 0.8   # spurious blob of member a only
    mean = average_probabilities([a, b])
    mask = mean > ensemble_threshold([0.5, 0.5])
    assert mask[1:3, 1:3, 1:3].all() and not mask[4:6, 4:6, 4:6].any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        average_probabilities([np.zeros((2, 2, 2)), np.zeros((2, 2, 3))])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        average_probabilities([np.full((2, 2, 2), 1.5)])
    with pytest.raises(ValueError, match="weight"):
        average_probabilities([np.zeros((2, 2, 2))], weights=[0])
    with pytest.raises(ValueError, match="no probability"):
        average_probabilities([])
    with pytest.raises(ValueError, match="thresholds"):
        ensemble_threshold([0.5, 1.0])
    assert ensemble_threshold([0.3, 0.5, 0.7]) == pytest.approx(0.5)
    assert ensemble_min_lesion_size([3.0, 15.0]) == 9.0
    with pytest.raises(ValueError, match="minimum lesion sizes"):
        ensemble_min_lesion_size([3.0, -1.0])
    with pytest.raises(ValueError, match="minimum lesion sizes"):
        ensemble_min_lesion_size([])
    # the core threshold: the mean where every member chose one, else no core rule
    assert ensemble_core_threshold([0.5, 0.9]) == 0.7 and ensemble_core_threshold([0.5, None]) is None
    with pytest.raises(ValueError, match="core thresholds"):
        ensemble_core_threshold([1.2])
    with pytest.raises(ValueError, match="core thresholds"):
        ensemble_core_threshold([])


def test_member_conventions():
    check_member_conventions([{"orientation": "RAS"}, {}])
    with pytest.raises(ValueError, match="runB: its network saw 'LPS'"):
        check_member_conventions([{"orientation": "RAS"}, {"orientation": "LPS"}], names=["runA", "runB"])
    with pytest.raises(ValueError, match="at least one"):
        check_member_conventions([])
