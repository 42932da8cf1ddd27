"""Choose the probability threshold of a trained model on validation volumes.

Why not the best voxel Dice: on validation cases made from the same host scans as the training
cases, over-segmentation costs little Dice (the network has seen every bright structure of that
head), so the search drifts to the lowest threshold; on a new patient with a light lesion load the
same threshold floods the scan with false-positive lesions (issue 9: Dice 0.06, 232 predicted
lesions for 33). Lesion-wise F1 counts every spurious component as a false positive however
small, and merged lesions as misses, so it cannot be raised by over-segmenting. The criterion is
computed with the MSSEG 2016 detection rule of :mod:`planar3d.metrics.lesion` (not re-implemented
here).

Criteria (per-case scores averaged over the cases, then compared across thresholds):

* ``"lesion_f1"``: mean lesion-wise F1 (default);
* ``"dice"``: mean voxel Dice (the former behaviour, kept for comparison);
* ``"dice_and_f1"``: mean of (Dice + lesion F1) / 2 per case.

Ties (equal scores up to 1e-12) go to the **higher** threshold: the more conservative mask.
A threshold ``t`` keeps ``probability > t`` and then drops the 6-connected components of at most
``min_lesion_size`` mm³, the rule ``planar3d predict`` applies, so the score of the chosen pair is
the score of what prediction will write.

The minimum lesion size is chosen with the threshold when several are given
(``validation.min_lesion_sizes``), as nnU-Net chooses its post-processing on validation cases:
a threshold alone trades every small false-positive blob against the edges of true lesions,
while a size in mm³ removes the specks whatever the voxel size. Ties go to the **smaller**
size: what validation cannot tell apart is not removed.

A core threshold (``validation.core_thresholds``) is chosen with them when given: hysteresis,
the components whose highest probability is at most it are dropped too (a real lesion has a
confident core, a spurious blob often has none), or no core rule when that scores as well.
Only core thresholds above ``t`` change a mask, so only those are tried with ``t``. Ties go to
the **higher** core threshold (after threshold and size): the more conservative mask. Measured
on twelve trained runs: docs/training.md, "Issue 9, sixth session".

Example:
    >>> import numpy as np
    >>> p = np.zeros((8, 8, 8), np.float32); p[2:5, 2:5, 2:5] = 0.9
    >>> label = p > 0.5
    >>> choose_threshold([p], [label], [(1, 1, 1)], [0.3, 0.5, 0.7]).threshold
    0.7
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from planar3d.metrics.lesion import (
    DetectionParameters, components, label_lesions, maximum_per_component, overlap_lesion_metrics, overlap_matrix,
)

CRITERIA = ("lesion_f1", "dice", "dice_and_f1")
_TIE_DECIMALS = 12  # scores equal to 12 decimals are a tie (mean of floats differs in the last bits)


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold (and minimum lesion size) and the scores behind the choice.

    Attributes:
        threshold: the chosen threshold.
        criterion: the criterion it maximises.
        score: its criterion value.
        table: one row per (threshold, minimum lesion size, core threshold), thresholds in input
            order, sizes in input order within each, no core rule first: ``threshold``,
            ``min_lesion_size``, ``core_threshold`` (None: no core rule), ``score`` (criterion),
            ``dice``, ``lesion_f1``, ``lesion_ppv``, ``lesion_sensitivity`` (means over cases;
            PPV/sensitivity ignore cases where they are undefined, nan if all are) and
            ``n_pred`` (predicted lesions summed over cases).
        min_lesion_size: the chosen minimum lesion size (mm³).
        core_threshold: the chosen core threshold, or None (no core rule).
    """

    threshold: float
    criterion: str
    score: float
    table: List[Dict[str, float]]
    min_lesion_size: float = DetectionParameters.min_lesion_size
    core_threshold: Optional[float] = None


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


class _Components:
    """The 6-connected components of ``probability > threshold`` with what scoring any subset
    of them needs: voxel counts, overlaps with the reference lesions and with the label, and
    highest probabilities. A subset is a boolean ``keep`` over components ``1..n``; dropping
    components only removes them, so its scores equal those of the relabelled mask (tests)."""

    def __init__(self, probability, threshold, label, ref_labels, n_ref, spacing, with_maxima: bool = True):
        labels, n = components(probability > threshold)
        flat = labels.ravel()
        self.voxel = float(np.prod(np.asarray(spacing, dtype=float)))
        self.counts = np.bincount(flat, minlength=n + 1)
        self.sizes = self.counts * self.voxel  # mm³, as drop_small_components computes them
        self.on_label = np.bincount(flat, weights=label.ravel(), minlength=n + 1)
        self.label_voxels = int(np.count_nonzero(label))
        self.matrix = overlap_matrix(ref_labels, n_ref, labels, n)
        self.maxima = np.zeros(0)
        if n and with_maxima:  # only a core threshold reads them: no pass over the volume otherwise
            coordinates = np.nonzero(labels)
            self.maxima = maximum_per_component(probability[coordinates], labels[coordinates])

    def keep(self, min_lesion_size: float, core_threshold: Optional[float]) -> np.ndarray:
        """Components kept by the size rule (volume > ``min_lesion_size``) and the core rule."""
        kept = self.sizes[1:] > min_lesion_size
        return kept if core_threshold is None else kept & (self.maxima > core_threshold)

    def overlaps(self, keep: np.ndarray) -> np.ndarray:
        """The overlap matrix of the reference lesions and the kept components (renumbered in
        order); the dropped ones' voxels join the background column."""
        ids = np.flatnonzero(keep) + 1
        dropped = np.flatnonzero(~keep) + 1
        matrix = self.matrix[:, np.r_[0, ids]].copy()
        matrix[:, 0] += self.matrix[:, dropped].sum(axis=1)
        return matrix

    def dice(self, keep: np.ndarray) -> float:
        """Voxel Dice of the kept components against the label (as planar3d.metrics.voxel.dice)."""
        predicted = int(self.counts[1:][keep].sum())
        denominator = predicted + self.label_voxels
        return 1.0 if denominator == 0 else 2.0 * int(self.on_label[1:][keep].sum()) / denominator


def threshold_table(
    probabilities: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    thresholds: Sequence[float],
    params: DetectionParameters = DetectionParameters(),
    min_lesion_sizes: Optional[Sequence[float]] = None,
    core_thresholds: Sequence[float] = (),
) -> List[Dict[str, float]]:
    """Mean Dice and lesion-wise scores of the masks prediction would write, for each
    threshold ``t``, minimum lesion size ``m`` and core threshold ``h`` (None, and each of
    ``core_thresholds`` above ``t``): ``probability > t`` without its components of at most
    ``m`` mm³ and, with ``h``, without those whose highest probability is at most ``h``.

    Args:
        probabilities: one foreground probability map per case.
        labels: the reference masks, same shapes.
        spacings: voxel spacing (mm) of each case, in the arrays' axis order.
        thresholds: thresholds to score.
        params: lesion detection rule (MSSEG 2016 defaults).
        min_lesion_sizes: minimum lesion sizes (mm³) to score; default ``params.min_lesion_size``.
        core_thresholds: core thresholds to score besides none (default: none).

    Raises:
        ValueError: mismatched lengths or shapes, no case / no threshold / no size, a negative
            size, or a core threshold outside [0, 1).
    """
    if not (len(probabilities) == len(labels) == len(spacings)) or not probabilities:
        raise ValueError(f"need as many probability maps, labels and spacings (>= 1), got "
                         f"{len(probabilities)}, {len(labels)}, {len(spacings)}")
    if not len(thresholds):
        raise ValueError("no threshold to choose from")
    sizes = [float(params.min_lesion_size)] if min_lesion_sizes is None else [float(m) for m in min_lesion_sizes]
    if not sizes or any(m < 0 or np.isnan(m) for m in sizes):
        raise ValueError(f"need minimum lesion sizes >= 0 mm³, got {sizes}")
    cores = [float(h) for h in core_thresholds]
    if any(not 0.0 <= h < 1.0 for h in cores):
        raise ValueError(f"need core thresholds in [0, 1), got {cores}")
    cases = []
    for probability, label, spacing in zip(probabilities, labels, spacings):
        probability, label = np.asarray(probability), np.asarray(label).astype(bool, copy=False)
        if probability.shape != label.shape:
            raise ValueError(f"probability shape {probability.shape} differs from label shape {label.shape}")
        cases.append((probability, label, spacing, label_lesions(label, spacing, params.min_lesion_size)))
    rows = []
    for t in thresholds:
        variants = [(m, h) for m in sizes for h in [None] + [h for h in cores if h > t]]
        per_variant: Dict[tuple, List[Dict[str, float]]] = {v: [] for v in variants}
        for probability, label, spacing, (ref_labels, n_ref) in cases:
            # labelled once per threshold; each (size, core) variant keeps a subset of these
            # components, so its masks' scores come from their per-component counts (no pass
            # over the volume per variant)
            found = _Components(probability, t, label, ref_labels, n_ref, spacing, with_maxima=len(variants) > len(sizes))
            for m, h in variants:
                # planar3d predict's mask (pipelines.predict_steps.lesion_mask): size, then core rule
                written = found.keep(m, h)
                # the detection rule's own size filter; already applied when m is at least its size
                scored = written if m >= params.min_lesion_size else written & found.keep(params.min_lesion_size, None)
                scores = overlap_lesion_metrics(found.overlaps(scored), params)
                scores["dice"] = found.dice(written)
                per_variant[(m, h)].append(scores)
        for m, h in variants:
            per_case = per_variant[(m, h)]
            rows.append({
                "threshold": float(t),
                "min_lesion_size": m,
                "core_threshold": h,
                "dice": float(np.mean([s["dice"] for s in per_case])),
                "lesion_f1": float(np.mean([s["lesion_f1"] for s in per_case])),
                "dice_and_f1": float(np.mean([(s["dice"] + s["lesion_f1"]) / 2 for s in per_case])),
                "lesion_ppv": _nanmean([s["lesion_ppv"] for s in per_case]),
                "lesion_sensitivity": _nanmean([s["lesion_sensitivity"] for s in per_case]),
                "n_pred": float(sum(s["n_pred"] for s in per_case)),
            })
    return rows


def choose_threshold(
    probabilities: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    thresholds: Sequence[float],
    criterion: str = "lesion_f1",
    params: DetectionParameters = DetectionParameters(),
    min_lesion_sizes: Optional[Sequence[float]] = None,
    core_thresholds: Sequence[float] = (),
) -> ThresholdChoice:
    """The (threshold, minimum lesion size, core threshold) maximising ``criterion`` over the
    cases; ties go to the higher threshold, then to the smaller size, then to the higher core
    threshold (none is the lowest).

    Args: as :func:`threshold_table`, plus ``criterion`` (one of :data:`CRITERIA`).

    Raises:
        ValueError: unknown criterion, or as :func:`threshold_table`.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    table = threshold_table(probabilities, labels, spacings, thresholds, params, min_lesion_sizes, core_thresholds)
    for row in table:
        row["score"] = row[criterion]
    best = max(table, key=lambda row: (round(row["score"], _TIE_DECIMALS), row["threshold"], -row["min_lesion_size"],
                                       -1.0 if row["core_threshold"] is None else row["core_threshold"]))
    return ThresholdChoice(best["threshold"], criterion, best["score"], table, best["min_lesion_size"], best["core_threshold"])
