import math

import numpy as np
import pytest

from planar3d.metrics.voxel import (
    confusion_counts, dice, ppv, relative_volume_difference, sensitivity, specificity, voxel_metrics, volume_mm3,
)

SPACING = (2.0, 1.0, 1.5)  # 3 mm³ per voxel


def two_cubes():
    ref = np.zeros((8, 8, 8), bool)
    ref[0:4, 0:4, 0:4] = True  # 64 voxels
    pred = np.zeros_like(ref)
    pred[2:6, 0:4, 0:6] = True  # 96 voxels, 32 shared with ref
    return pred, ref


def test_confusion_counts_of_two_cubes():
    pred, ref = two_cubes()
    assert confusion_counts(pred, ref) == {"tp": 32, "fp": 64, "fn": 32, "tn": 384}


def test_voxel_metrics_of_two_cubes_are_exact():
    pred, ref = two_cubes()
    m = voxel_metrics(pred, ref, SPACING)
    assert m == {
        "dice": 0.4,
        "sensitivity": 0.5,
        "specificity": 384 / 448,
        "ppv": 1 / 3,
        "volume_pred_mm3": 288.0,
        "volume_ref_mm3": 192.0,
        "avd_mm3": 96.0,
        "avd_rel": 0.5,
        "rvd": 0.5,
    }
    assert dice(pred, ref) == 0.4 and sensitivity(pred, ref) == 0.5 and ppv(pred, ref) == 1 / 3
    assert specificity(pred, ref) == 384 / 448
    assert volume_mm3(ref, SPACING) == 192.0


def test_relative_volume_difference_is_signed():
    pred, ref = two_cubes()
    assert relative_volume_difference(ref, pred) == (64 - 96) / 96
    assert voxel_metrics(ref, pred, SPACING)["avd_rel"] == 32 / 96


def test_both_empty():
    empty = np.zeros((3, 3, 3), bool)
    m = voxel_metrics(empty, empty, SPACING)
    assert m["dice"] == 1.0 and m["rvd"] == 0.0 and m["avd_rel"] == 0.0 and m["avd_mm3"] == 0.0
    assert m["specificity"] == 1.0
    assert math.isnan(m["sensitivity"]) and math.isnan(m["ppv"])


def test_prediction_empty():
    pred, ref = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    ref[1, 1, 1] = True
    m = voxel_metrics(pred, ref, (1, 1, 1))
    assert m["dice"] == 0.0 and m["sensitivity"] == 0.0 and math.isnan(m["ppv"])
    assert m["rvd"] == -1.0 and m["avd_rel"] == 1.0


def test_reference_empty():
    pred, ref = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    pred[1, 1, 1] = True
    m = voxel_metrics(pred, ref, (1, 1, 1))
    assert m["dice"] == 0.0 and m["ppv"] == 0.0 and m["specificity"] == 26 / 27
    assert math.isnan(m["sensitivity"]) and math.isnan(m["rvd"]) and math.isnan(m["avd_rel"])
    assert m["avd_mm3"] == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
