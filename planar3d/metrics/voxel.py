"""Voxel-wise overlap and volume metrics between a predicted and a reference binary mask.

All functions take two boolean (or 0/1) arrays of the same shape in voxel order and, where a
volume is involved, the voxel spacing in millimetres. A ratio whose denominator is zero is
*undefined* and returned as ``nan`` on purpose; aggregation (:mod:`pipelines.evaluate`) counts
such values instead of dropping them. Conventions (see ``docs/metrics.md``):

* Dice: both masks empty -> 1.0.
* sensitivity: reference empty -> nan; PPV: prediction empty -> nan; specificity: reference
  covers the whole image -> nan.
* relative volume differences: reference empty -> 0.0 when the prediction is empty too, nan
  otherwise.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((4, 4, 4), bool); ref[:2] = True
    >>> pred = np.zeros((4, 4, 4), bool); pred[1:3] = True
    >>> dice(pred, ref)
    0.5
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> Dict[str, int]:
    """True/false positive/negative voxel counts: keys ``tp``, ``fp``, ``fn``, ``tn``."""
    pred, ref = _as_masks(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp = n_pred - tp
    fn = n_ref - tp
    tn = int(pred.size) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else float("nan")


def voxel_volume(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mm³ (product of the spacing)."""
    return float(np.prod(np.asarray(spacing, dtype=float)))


def volume_mm3(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a binary mask in mm³."""
    return float(np.count_nonzero(mask)) * voxel_volume(spacing)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2|P∩R| / (|P|+|R|); 1.0 when both masks are empty."""
    c = confusion_counts(pred, ref)
    denominator = 2 * c["tp"] + c["fp"] + c["fn"]
    return 1.0 if denominator == 0 else 2.0 * c["tp"] / denominator


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """True positive rate |P∩R| / |R|; nan (undefined) when the reference is empty."""
    c = confusion_counts(pred, ref)
    return _ratio(c["tp"], c["tp"] + c["fn"])


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """True negative rate TN / (TN+FP); nan when the reference covers every voxel."""
    c = confusion_counts(pred, ref)
    return _ratio(c["tn"], c["tn"] + c["fp"])


def ppv(pred: np.ndarray, ref: np.ndarray) -> float:
    """Positive predictive value |P∩R| / |P|; nan (undefined) when the prediction is empty."""
    c = confusion_counts(pred, ref)
    return _ratio(c["tp"], c["tp"] + c["fp"])


def _relative(difference: float, reference_volume: float) -> float:
    if reference_volume == 0:
        return 0.0 if difference == 0 else float("nan")
    return difference / reference_volume


def relative_volume_difference(pred: np.ndarray, ref: np.ndarray) -> float:
    """Signed (Vp - Vr) / Vr; 0.0 when both are empty, nan when only the reference is empty."""
    pred, ref = _as_masks(pred, ref)
    vp, vr = float(np.count_nonzero(pred)), float(np.count_nonzero(ref))
    return _relative(vp - vr, vr)


def voxel_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Every voxel-wise metric at once.

    Returns:
        ``dice``, ``sensitivity``, ``specificity``, ``ppv``, ``volume_pred_mm3``,
        ``volume_ref_mm3``, ``avd_mm3`` (|Vp - Vr| in mm³), ``avd_rel`` (|Vp - Vr| / Vr) and
        ``rvd`` ((Vp - Vr) / Vr), with the empty-mask conventions of the module docstring.
    """
    pred, ref = _as_masks(pred, ref)
    c = confusion_counts(pred, ref)
    unit = voxel_volume(spacing)
    n_pred, n_ref = c["tp"] + c["fp"], c["tp"] + c["fn"]
    denominator = n_pred + n_ref
    rvd = _relative(float(n_pred - n_ref), float(n_ref))
    return {
        "dice": 1.0 if denominator == 0 else 2.0 * c["tp"] / denominator,
        "sensitivity": _ratio(c["tp"], n_ref),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "ppv": _ratio(c["tp"], n_pred),
        "volume_pred_mm3": n_pred * unit,
        "volume_ref_mm3": n_ref * unit,
        "avd_mm3": abs(n_pred - n_ref) * unit,
        "avd_rel": abs(rvd),
        "rvd": rvd,
    }
