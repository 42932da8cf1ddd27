"""Tests of planar3d.preprocess intensity normalisation (both methods)."""

import numpy as np
import pytest

from planar3d.data.phantom import make_phantom_parts
from planar3d.preprocess import NormalizationConfig, normalize_intensity, white_matter_level

WM_PEAK = NormalizationConfig(method="white_matter_peak")


@pytest.mark.parametrize("stripped", [False, True])
def test_white_matter_peak_maps_white_matter_to_its_value(stripped):
    phantom = make_phantom_parts(np.random.default_rng(1), bias=False, noise=False, brain_extracted=stripped, keep_tissues=True)
    level, _ = white_matter_level(phantom.flair)
    assert abs(level / phantom.info["wm_level"] - 1) < 0.02  # not grey matter (x1.12-1.28) nor fat (x1.6-2.1)
    out = normalize_intensity(phantom.flair, WM_PEAK) * WM_PEAK.std + WM_PEAK.mean  # back to the [0, 1] scale
    white = phantom.tissues["wm"] > 0.99
    assert abs(float(np.median(out[white])) - 0.5) < 0.01
    lesion = phantom.lesion_fraction > 0.99
    ratio = phantom.info["lesion_level"] / phantom.info["wm_level"]
    assert abs(float(np.median(out[lesion])) - 0.5 * ratio) < 0.02


def test_white_matter_peak_is_unchanged_by_skull_stripping_unlike_percentiles():
    raw = make_phantom_parts(np.random.default_rng(2), bias=False)
    stripped = make_phantom_parts(np.random.default_rng(2), bias=False, brain_extracted=True)
    lesion = raw.lesions > 0
    for config, limit in ((WM_PEAK, 0.03), (NormalizationConfig(), None)):
        a, b = normalize_intensity(raw.flair, config)[lesion], normalize_intensity(stripped.flair, config)[lesion]
        shift = abs(float(np.median(a) - np.median(b))) * config.std  # in units of the [0, 1] scale
        if limit is not None:
            assert shift < limit
        else:
            assert shift > 0.2  # the percentile scale moves lesions a lot


def test_normalization_config_rejects_unknown_method_and_reads_old_checkpoints():
    with pytest.raises(ValueError, match="unknown normalisation method"):
        NormalizationConfig(method="zscore")
    with pytest.raises(ValueError, match="white_matter_value"):
        NormalizationConfig(method="white_matter_peak", white_matter_value=0)
    old = {k: v for k, v in NormalizationConfig().to_dict().items() if k not in ("method", "white_matter_value")}
    assert NormalizationConfig.from_dict(old).method == "percentile"


def test_white_matter_peak_needs_positive_intensities():
    volume = -np.abs(np.random.default_rng(0).normal(10, 3, (16, 16, 16))).astype(np.float32)
    with pytest.raises(ValueError, match="white-matter level"):
        normalize_intensity(volume, WM_PEAK)
