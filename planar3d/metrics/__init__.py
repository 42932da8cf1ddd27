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


__all__ = ["METRIC_NAMES", "DetectionParameters", "case_metrics", "lesion_metrics", "surface_metrics", "voxel_metrics"]
