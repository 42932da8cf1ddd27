"""Surface distances between a predicted and a reference binary mask, in millimetres.

The surface of a mask is the mask minus its binary erosion with the **6-connectivity** (face)
structuring element, the image border counting as background: a voxel is on the surface when at
least one of its 6 face neighbours is outside the mask (or outside the image). Distances from
each surface voxel of one mask to the nearest surface voxel of the other are exact Euclidean
distances with the voxel spacing. The surfaces come from MONAI
(:func:`monai.metrics.utils.get_mask_edges`, which works on the masks' bounding box, so whole
scans are fast) and the distances from :func:`scipy.ndimage.distance_transform_edt` in float64,
as MONAI's ``get_surface_distance`` computes them but without its rounding to float32; this
module adds only the empty-mask rule below.

Empty masks (see ``docs/metrics.md``): both empty -> 0.0; exactly one empty -> ``inf``, which
aggregation counts as undefined rather than averaging.

Example:
    >>> import numpy as np
    >>> a = np.zeros((5, 4, 4), bool); a[2] = True
    >>> b = np.roll(a, 1, axis=0)
    >>> hd95(a, b, spacing=(2.0, 1.0, 1.0))
    2.0
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

#: Percentile of the Hausdorff distance reported by :func:`hd95`.
HAUSDORFF_PERCENTILE = 95.0


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask: ``mask & ~erode(mask)`` with 6-connectivity (the edges
    MONAI measures distances between; for pictures and tests)."""
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _distances_to(target_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm, float64) of every voxel to the nearest voxel of ``target_surface``.

    MONAI's ``get_surface_distance`` is this transform rounded to float32; exact float64 keeps
    known distances exact (a voxel diagonal is sqrt(5) mm, not its float32 neighbour)."""
    return ndimage.distance_transform_edt(~target_surface, sampling=tuple(float(s) for s in spacing))


def directed_surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> Tuple[np.ndarray, np.ndarray]:
    """Distances pred-surface -> ref-surface and ref-surface -> pred-surface, in mm.

    Both masks must be non-empty (raises ValueError otherwise).
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one value per axis of shape {pred.shape}")
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    from monai.metrics.utils import get_mask_edges

    pred_edges, ref_edges = get_mask_edges(pred, ref, crop=True)  # numpy in, numpy out
    return _distances_to(ref_edges, spacing)[pred_edges], _distances_to(pred_edges, spacing)[ref_edges]


def _empty_case(pred: np.ndarray, ref: np.ndarray) -> float | None:
    has_pred, has_ref = bool(np.any(pred)), bool(np.any(ref))
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return float("inf")
    return None


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """``hd95`` and ``assd`` in mm, with the empty-mask conventions of the module docstring.

    ``hd95`` is the larger of the two directed 95th percentiles (as MONAI's
    ``compute_hausdorff_distance(percentile=95)``); ``assd`` is the mean of all distances of both
    directions pooled: (Σ d(p, R) + Σ d(r, P)) / (|∂P| + |∂R|).
    """
    special = _empty_case(pred, ref)
    if special is not None:
        return {"hd95": special, "assd": special}
    d_pred, d_ref = directed_surface_distances(pred, ref, spacing)
    hd = max(np.percentile(d_pred, HAUSDORFF_PERCENTILE), np.percentile(d_ref, HAUSDORFF_PERCENTILE))
    assd = (d_pred.sum() + d_ref.sum()) / (d_pred.size + d_ref.size)
    return {"hd95": float(hd), "assd": float(assd)}


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see :func:`surface_metrics`)."""
    return surface_metrics(pred, ref, spacing)["hd95"]


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (see :func:`surface_metrics`)."""
    return surface_metrics(pred, ref, spacing)["assd"]
