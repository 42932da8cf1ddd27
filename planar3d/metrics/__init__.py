"""Segmentation metrics: voxel-wise overlap, surface distances, lesion-wise detection.

:func:`case_metrics` computes all of them for one prediction/reference pair; the definitions and
empty-mask conventions are in ``docs/metrics.md``.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from planar3d.metrics.lesion import DetectionParameters, lesion_metrics
from planar3d.metrics.surface import surface_metrics
from planar3d.metrics.voxel import voxel_metrics

#: Metric names in report order (all returned by :func:`case_metrics`).
METRIC_NAMES = (
    "dice", "sensitivity", "specificity", "ppv", "volume_pred_mm3", "volume_ref_mm3", "avd_mm3",
    "avd_rel", "rvd", "hd95", "assd", "n_ref", "n_pred", "tp_ref", "tp_pred",
    "lesion_sensitivity", "lesion_ppv", "lesion_f1",
)

#: One-line definition of each metric (copied into ``summary.json``; details in ``docs/metrics.md``).
DEFINITIONS = {
    "dice": "2|P∩R|/(|P|+|R|) on voxels; 1 when both masks are empty",
    "sensitivity": "voxel TPR |P∩R|/|R|; undefined (nan) when R is empty",
    "specificity": "voxel TNR TN/(TN+FP); undefined (nan) when R fills the image",
    "ppv": "voxel precision |P∩R|/|P|; undefined (nan) when P is empty",
    "volume_pred_mm3": "Vp, predicted volume in mm³",
    "volume_ref_mm3": "Vr, reference volume in mm³",
    "avd_mm3": "|Vp - Vr| in mm³",
    "avd_rel": "|Vp - Vr| / Vr; 0 when both empty, undefined (nan) when only R is empty",
    "rvd": "signed (Vp - Vr) / Vr; 0 when both empty, undefined (nan) when only R is empty",
    "hd95": "max of the two directed 95th-percentile surface distances (mm), surfaces by 6-connected "
            "erosion; 0 when both empty, inf when exactly one is empty",
    "assd": "mean of all surface distances of both directions pooled (mm); 0 when both empty, inf when "
            "exactly one is empty",
    "n_ref": "reference lesions (6-connected components larger than min_lesion_size mm³)",
    "n_pred": "predicted lesions (same rule)",
    "tp_ref": "reference lesions detected by the prediction (MSSEG 2016 rule with alpha, beta, gamma)",
    "tp_pred": "predicted lesions detected by the reference (same rule, roles swapped)",
    "lesion_sensitivity": "tp_ref / n_ref; undefined (nan) when n_ref = 0",
    "lesion_ppv": "tp_pred / n_pred; undefined (nan) when n_pred = 0",
    "lesion_f1": "2 S P / (S + P); 1 when both have no lesion, 0 when exactly one has none or S + P = 0",
}


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], params: DetectionParameters = DetectionParameters()
) -> Dict[str, float]:
    """All voxel, surface and lesion-wise metrics of one case, keyed as :data:`METRIC_NAMES`."""
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    values: Dict[str, float] = {}
    values.update(voxel_metrics(pred, ref, spacing))
    values.update(surface_metrics(pred, ref, spacing))
    values.update(lesion_metrics(pred, ref, spacing, params))
    return {name: values[name] for name in METRIC_NAMES}


__all__ = ["DEFINITIONS", "METRIC_NAMES", "DetectionParameters", "case_metrics", "lesion_metrics", "surface_metrics", "voxel_metrics"]
