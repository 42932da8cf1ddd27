import math

import numpy as np

from planar3d.metrics.lesion import DetectionParameters, detected, label_lesions, lesion_metrics, overlap_matrix

ISO = (1.0, 1.0, 1.0)


def box(shape, *slices):
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


def test_prediction_covering_half_detects_the_lesion():
    ref = box((8, 8, 8), slice(1, 5), slice(1, 5), slice(1, 5))
    pred = box((8, 8, 8), slice(1, 3), slice(1, 5), slice(1, 5))
    assert lesion_metrics(pred, ref, ISO) == {
        "n_ref": 1, "n_pred": 1, "tp_ref": 1, "tp_pred": 1,
        "lesion_sensitivity": 1.0, "lesion_ppv": 1.0, "lesion_f1": 1.0,
    }


def test_prediction_mostly_outside_does_not_detect():
    ref = box((14, 6, 6), slice(1, 5), slice(1, 5), slice(1, 5))  # 64 voxels
    pred = box((14, 6, 6), slice(3, 13), slice(1, 5), slice(1, 5))  # 160 voxels, 32 inside ref
    m = lesion_metrics(pred, ref, ISO)
    # ref lesion: covered 50 % but the only contributor is 80 % outside (> gamma) -> missed.
    # pred lesion: covered 20 % by ref, which is 50 % outside the prediction (<= gamma) -> true positive.
    assert (m["tp_ref"], m["tp_pred"]) == (0, 1)
    assert m["lesion_sensitivity"] == 0.0 and m["lesion_ppv"] == 1.0 and m["lesion_f1"] == 0.0


def test_beta_keeps_a_detection_already_covered_before_a_bad_contributor():
    shape = (12, 4, 13)
    ref = box(shape, slice(1, 11), slice(1, 3), slice(1, 3))  # 40 voxels
    leaky = box(shape, slice(9, 11), slice(1, 3), slice(1, 12))  # 44 voxels, 8 inside ref: 82 % outside
    good = box(shape, slice(1, 8), slice(1, 3), slice(1, 3))  # 28 voxels inside: 70 % >= beta
    assert lesion_metrics(good | leaky, ref, ISO)["tp_ref"] == 1
    small = box(shape, slice(1, 6), slice(1, 3), slice(1, 3))  # 20 voxels inside: 50 % < beta
    assert lesion_metrics(small | leaky, ref, ISO)["tp_ref"] == 0
    assert lesion_metrics(small, ref, ISO)["tp_ref"] == 1


def test_detected_rule_directly():
    # overlaps in any order are sorted decreasing; alpha is strict.
    assert detected(np.array([1, 0]), np.array([1, 5]), 10) is False  # coverage 0.1 is not > alpha
    assert detected(np.array([0, 2]), np.array([5, 2]), 10) is True
    p = DetectionParameters(alpha=0.1, beta=0.65, gamma=0.7)
    assert detected(np.array([5, 7]), np.array([100, 7]), 10, p) is True  # 0.7 then a leaky one
    assert detected(np.array([7, 5]), np.array([7, 100]), 10, p) is True
    assert detected(np.array([6, 5]), np.array([6, 100]), 10, p) is False


def test_tiny_components_removed_from_both_masks():
    spacing = (1.0, 1.0, 1.5)  # 1.5 mm³ per voxel
    ref = box((10, 10, 10), slice(1, 4), slice(1, 4), slice(1, 4))
    ref[7, 7, 7:9] = True  # 2 voxels = 3 mm³ -> removed
    ref[7, 1, 1:4] = True  # 3 voxels = 4.5 mm³ -> kept, not predicted
    pred = ref.copy()
    pred[7, 1, 1:4] = False
    pred[1, 8, 8:10] = True  # 3 mm³ false positive -> removed
    labels, n = label_lesions(ref, spacing)
    assert n == 2 and set(np.unique(labels)) == {0, 1, 2} and labels[7, 7, 7] == 0
    m = lesion_metrics(pred, ref, spacing)
    assert (m["n_ref"], m["n_pred"], m["tp_ref"], m["tp_pred"]) == (2, 1, 1, 1)
    assert m["lesion_sensitivity"] == 0.5 and m["lesion_ppv"] == 1.0 and m["lesion_f1"] == 2 * 0.5 / 1.5
    assert lesion_metrics(pred, ref, spacing, DetectionParameters(min_lesion_size=0))["n_ref"] == 3


def test_six_connectivity():
    mask = np.zeros((5, 5, 5), bool)
    mask[0:2, 0:2, 0:2] = True
    mask[2:4, 2:4, 0:2] = True  # touches the first block along an edge only
    assert label_lesions(mask, ISO)[1] == 2


def test_overlap_matrix():
    a = np.array([[[0, 1, 1, 2]]])
    b = np.array([[[1, 1, 0, 1]]])
    assert overlap_matrix(a, 2, b, 1).tolist() == [[0, 1], [1, 1], [0, 1]]


def test_empty_cases():
    empty = np.zeros((6, 6, 6), bool)
    lesion = box((6, 6, 6), slice(1, 3), slice(1, 3), slice(1, 3))
    m = lesion_metrics(empty, empty, ISO)
    assert (m["n_ref"], m["n_pred"], m["lesion_f1"]) == (0, 0, 1.0)
    assert math.isnan(m["lesion_sensitivity"]) and math.isnan(m["lesion_ppv"])
    m = lesion_metrics(lesion, empty, ISO)
    assert math.isnan(m["lesion_sensitivity"]) and m["lesion_ppv"] == 0.0 and m["lesion_f1"] == 0.0
    m = lesion_metrics(empty, lesion, ISO)
    assert m["lesion_sensitivity"] == 0.0 and math.isnan(m["lesion_ppv"]) and m["lesion_f1"] == 0.0


def test_maximum_per_component_equals_scipy_and_its_doctest():
    import doctest

    from scipy import ndimage

    import planar3d.metrics.lesion as lesion

    assert doctest.testmod(lesion).failed == 0
    rng = np.random.default_rng(1)
    values = rng.random((20, 18, 12))
    labels, n = lesion.components(values > 0.85)
    coordinates = np.nonzero(labels)
    maxima = lesion.maximum_per_component(values[coordinates], labels[coordinates])
    assert n > 50 and maxima.tolist() == ndimage.maximum(values, labels, np.arange(1, n + 1)).tolist()


def test_drop_small_components_keeps_the_labels_when_nothing_is_dropped():
    from planar3d.metrics.lesion import components, drop_small_components

    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, :2] = True   # 2 voxels
    mask[4, 4, 4] = True    # 1 voxel
    labels, n = components(mask)
    kept, m = drop_small_components(labels, n, (1, 1, 1), 0.0)
    assert m == 2 and kept is labels                      # no renumbering pass
    kept, m = drop_small_components(labels, n, (1, 1, 1), 1.0)
    assert m == 1 and int(kept.max()) == 1 and int((kept > 0).sum()) == 2   # the single voxel dropped, renumbered
