"""Threshold choice by lesion-wise F1 / Dice, and the shared-host warning."""

from pathlib import Path

import numpy as np
import pytest

from planar3d.data.hosts import host_key, shared_host_warning, shared_hosts
from planar3d.data.manifest import Case
from planar3d.thresholds import choose_threshold, threshold_table


def _two_lesions_and_false_positives():
    """Two 6^3 lesions predicted confidently (0.9) except their first and last x-planes (0.3),
    and eight 2^3 false-positive blobs at 0.3: a low threshold gains Dice and loses lesion F1."""
    label = np.zeros((40, 40, 40), bool)
    probability = np.zeros((40, 40, 40), np.float32)
    for x in (4, 24):
        label[x:x + 6, 4:10, 4:10] = True
        probability[x:x + 6, 4:10, 4:10] = 0.3
        probability[x + 1:x + 5, 4:10, 4:10] = 0.9
    for k in range(8):
        probability[4 * k + 2:4 * k + 4, 30:32, 30:32] = 0.3
    return probability, label


def test_f1_picks_higher_threshold_where_dice_picks_lower():
    probability, label = _two_lesions_and_false_positives()
    args = ([probability], [label], [(1.0, 1.0, 1.0)], [0.2, 0.5])
    by_dice = choose_threshold(*args, criterion="dice")
    by_f1 = choose_threshold(*args, criterion="lesion_f1")
    by_both = choose_threshold(*args, criterion="dice_and_f1")
    assert by_dice.threshold == 0.2
    assert by_f1.threshold == 0.5
    assert by_both.threshold == 0.5
    low, high = by_f1.table
    # t=0.2: all 432 lesion voxels + 64 false-positive voxels; 2 of 10 predicted lesions true.
    assert low["dice"] == pytest.approx(2 * 432 / (432 + 496))
    assert low["lesion_f1"] == pytest.approx(2 * 1.0 * 0.2 / 1.2)
    assert low["n_pred"] == 10
    # t=0.5: the two 4x6x6 cores only; both lesions detected, no false positive.
    assert high["dice"] == pytest.approx(2 * 288 / (288 + 432))
    assert high["lesion_f1"] == 1.0 and high["lesion_ppv"] == 1.0
    assert by_f1.score == 1.0


def test_ties_go_to_the_higher_threshold():
    label = np.zeros((10, 10, 10), bool)
    label[2:6, 2:6, 2:6] = True
    probability = label.astype(np.float32)
    for criterion in ("lesion_f1", "dice", "dice_and_f1"):
        choice = choose_threshold([probability], [label], [(1, 1, 1)], [0.3, 0.7, 0.5], criterion=criterion)
        assert choice.threshold == 0.7
        assert [row["threshold"] for row in choice.table] == [0.3, 0.7, 0.5]


def test_scores_are_means_over_cases():
    probability, label = _two_lesions_and_false_positives()
    empty = np.zeros((5, 5, 5), np.float32)
    rows = threshold_table([probability, empty], [label, empty > 0], [(1, 1, 1)] * 2, [0.5])
    # the lesion-free case predicted lesion-free scores Dice 1 and F1 1
    assert rows[0]["dice"] == pytest.approx((2 * 288 / 720 + 1.0) / 2)
    assert rows[0]["lesion_f1"] == 1.0


def test_bad_arguments():
    probability, label = _two_lesions_and_false_positives()
    with pytest.raises(ValueError, match="criterion"):
        choose_threshold([probability], [label], [(1, 1, 1)], [0.5], criterion="auc")
    with pytest.raises(ValueError, match="shape"):
        threshold_table([probability], [label[:-1]], [(1, 1, 1)], [0.5])
    with pytest.raises(ValueError, match="as many"):
        threshold_table([probability], [], [(1, 1, 1)], [0.5])


def _case(case_id, group):
    return Case(case_id, Path(f"{case_id}.nii.gz"), Path(f"{case_id}_l.nii.gz"), group)


def test_host_key_rule():
    assert host_key(_case("a", "host-RAS")) == "RAS"
    assert host_key(_case("a", "host-flair_head_1mm-RAS-brain")) == "flair_head_1mm-RAS"
    assert host_key(_case("a", "3d-LPS")) is None          # phantom
    assert host_key(_case("a", "01")) is None              # MSSEG centre
    assert host_key(_case("a", None)) is None


def test_shared_host_warning():
    train = [_case("t0", "host-a-LPS"), _case("t1", "host-a-LPS-brain"), _case("t2", "3d-RAS")]
    assert shared_host_warning(train, [_case("v0", "host-b-LPS"), _case("v1", "3d-RAS")]) is None
    val = [_case("v0", "host-a-LPS-brain"), _case("v1", "host-b-LPS"), _case("v2", "host-a-LPS")]
    assert shared_hosts(train, val) == {"a-LPS": ["v0", "v2"]}
    warning = shared_host_warning(train, val)
    assert warning.startswith("2 of 3 validation case(s) share a host scan with training cases: a-LPS (v0, v2)")
    assert "\n" not in warning


def test_minimum_lesion_size_is_chosen_with_the_threshold():
    """The eight 2^3 false positives (8 mm³ each) survive every threshold that keeps the lesions'
    edges; removing components of <= 10 mm³ drops them and keeps the 216 mm³ lesions."""
    probability, label = _two_lesions_and_false_positives()
    args = ([probability], [label], [(1.0, 1.0, 1.0)], [0.2, 0.5])
    choice = choose_threshold(*args, criterion="dice_and_f1", min_lesion_sizes=[3, 10])
    assert (choice.threshold, choice.min_lesion_size, choice.score) == (0.2, 10.0, 1.0)
    # lesion F1 alone is 1.0 at (0.2, 10), (0.5, 3) and (0.5, 10): the higher threshold, then the smaller size
    by_f1 = choose_threshold(*args, min_lesion_sizes=[3, 10])
    assert (by_f1.threshold, by_f1.min_lesion_size) == (0.5, 3.0)
    assert [(r["threshold"], r["min_lesion_size"]) for r in choice.table] == [(0.2, 3.0), (0.2, 10.0), (0.5, 3.0), (0.5, 10.0)]
    low_cleaned = choice.table[1]
    assert low_cleaned["dice"] == 1.0 and low_cleaned["n_pred"] == 2
    # the same masks at 1 x 1 x 4 mm: each blob is 32 mm³, so 10 mm³ no longer removes them
    coarse = choose_threshold([probability], [label], [(1.0, 1.0, 4.0)], [0.2, 0.5], criterion="dice_and_f1",
                              min_lesion_sizes=[3, 10])
    assert (coarse.threshold, coarse.min_lesion_size) == (0.5, 3.0)


def test_size_ties_go_to_the_smaller_size_and_sizes_are_checked():
    probability, label = _two_lesions_and_false_positives()
    # at t=0.5 nothing is smaller than 100 mm³ (cores are 144 mm³): sizes 3 and 100 tie
    choice = choose_threshold([probability], [label], [(1, 1, 1)], [0.5], min_lesion_sizes=[100, 3])
    assert choice.min_lesion_size == 3.0
    with pytest.raises(ValueError, match="minimum lesion sizes"):
        threshold_table([probability], [label], [(1, 1, 1)], [0.5], min_lesion_sizes=[-1])
    with pytest.raises(ValueError, match="minimum lesion sizes"):
        threshold_table([probability], [label], [(1, 1, 1)], [0.5], min_lesion_sizes=[])


def test_core_threshold_drops_unconfident_components_and_is_chosen_with_the_threshold():
    """Two confident lesions (core 0.9) and a faint blob (at most 0.45) of the same size: above
    t = 0.3 the blob is a false positive whatever the size rule; a core threshold of 0.6 drops it."""
    probability = np.zeros((24, 24, 24), np.float32)
    label = np.zeros(probability.shape, bool)
    for corner in ((2, 2, 2), (14, 14, 14)):
        block = tuple(slice(c, c + 6) for c in corner)
        probability[block], label[block] = 0.5, True
        probability[tuple(slice(c + 2, c + 4) for c in corner)] = 0.9
    probability[2:8, 14:20, 2:8] = 0.4
    probability[4, 16, 4] = 0.45
    args = ([probability], [label], [(1.0, 1.0, 1.0)], [0.3])
    plain = choose_threshold(*args)
    assert plain.core_threshold is None and plain.score < 1.0            # the blob is a third lesion
    choice = choose_threshold(*args, core_thresholds=[0.6, 0.95])
    assert (choice.threshold, choice.core_threshold, choice.score) == (0.3, 0.6, 1.0)
    # rows: no core rule first, then each core threshold above t; 0.95 drops the lesions too
    assert [r["core_threshold"] for r in choice.table] == [None, 0.6, 0.95]
    assert choice.table[2]["n_pred"] == 0
    # a core threshold at or below t changes nothing, so it is not tried with that t
    assert [r["core_threshold"] for r in threshold_table([probability], [label], [(1, 1, 1)], [0.6], core_thresholds=[0.5, 0.6])] == [None]
    with pytest.raises(ValueError, match="core thresholds"):
        threshold_table([probability], [label], [(1, 1, 1)], [0.5], core_thresholds=[1.0])


def test_core_ties_go_to_the_higher_core_threshold():
    probability, label = _two_lesions_and_false_positives()
    # above 0.5 only the lesions' 0.9 cores remain: no core rule, 0.55 and 0.6 give the same masks
    choice = choose_threshold([probability], [label], [(1, 1, 1)], [0.5], core_thresholds=[0.55, 0.6])
    assert len({r["score"] for r in choice.table}) == 1 and choice.core_threshold == 0.6


def test_table_rows_are_the_scores_of_the_masks_predict_writes():
    """Each row's scores, computed from per-component counts, equal those of the mask
    pipelines.predict_steps.lesion_mask writes, scored from scratch (random blobs, anisotropic
    voxels, sizes below and above the detection rule's 3 mm³, core thresholds)."""
    from scipy import ndimage

    from pipelines.predict_steps import lesion_mask
    from planar3d.metrics.lesion import lesion_metrics
    from planar3d.metrics.voxel import dice

    rng = np.random.default_rng(7)
    probability = ndimage.gaussian_filter(rng.random((30, 28, 12)), 1.2).astype(np.float32)
    probability = (probability - probability.min()) / (probability.max() - probability.min())
    label = ndimage.gaussian_filter(rng.random(probability.shape), 1.5) > 0.55
    spacing = (1.0, 0.8, 2.5)
    thresholds, sizes, cores = [0.5, 0.6, 0.7], [0.0, 2.0, 3.0, 12.0], [0.65, 0.8]
    table = threshold_table([probability], [label], [spacing], thresholds, min_lesion_sizes=sizes, core_thresholds=cores)
    assert len(table) == 3 * 4 + 3 * 4 + 2 * 4  # none, and the cores above each threshold
    assert any(r["n_pred"] > 0 for r in table) and any(r["core_threshold"] is not None for r in table)
    for row in table:
        mask, _ = lesion_mask(probability, row["threshold"], spacing, row["min_lesion_size"], row["core_threshold"])
        expected = lesion_metrics(mask, label, spacing)
        assert row["dice"] == dice(mask, label)
        for key in ("lesion_f1", "lesion_sensitivity"):
            assert row[key] == expected[key] or (np.isnan(row[key]) and np.isnan(expected[key]))
        assert row["n_pred"] == expected["n_pred"]
