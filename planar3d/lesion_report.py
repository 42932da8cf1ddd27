"""Per-scan lesion report: lesion count and volume per scan, one row per lesion, a folder summary.

Lesions are the connected components of the mask under the rule predict and evaluate use
(:func:`planar3d.metrics.lesion.label_lesions`: 6-connectivity, components of volume
≤ ``min_lesion_size`` mm³ dropped), in the scan's own voxel grid. A voxel's volume is the product
of the voxel sizes (the affine's column norms), as in ``label_lesions``; centroids are the mean
voxel index of each lesion mapped through the affine to world (scanner RAS+) millimetres.

Example:
    >>> scan, lesions = report_from_files("x_mask.nii.gz", probability="x_prob.nii.gz")   # doctest: +SKIP
    >>> write_report_csvs("out", [scan], lesions)                                          # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from nibabel.affines import apply_affine

from planar3d.errors import InputError
from planar3d.io import atomic_write_text, read_volume, voxel_size
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3, label_lesions, maximum_per_component

#: File names written by :func:`write_report_csvs`.
SCANS_CSV = "lesion_report_scans.csv"
LESIONS_CSV = "lesion_report_lesions.csv"
SUMMARY_CSV = "lesion_report_summary.csv"


@dataclass(frozen=True)
class ScanRow:
    """One scan: lesion count, total volume (mL), brain volume and lesion load when a brain mask is known."""

    scan: str
    lesion_count: int
    lesion_volume_ml: float
    brain_volume_ml: float = math.nan
    lesion_load_percent_of_brain: float = math.nan


@dataclass(frozen=True)
class LesionRow:
    """One lesion: id (its label, 1..n in scan order), size, world centroid (mm), max probability."""

    scan: str
    lesion_id: int
    voxels: int
    volume_mm3: float
    centroid_x_mm: float
    centroid_y_mm: float
    centroid_z_mm: float
    max_probability: float = math.nan


def scan_lesion_report(
    mask: np.ndarray,
    affine: np.ndarray,
    scan: str,
    probability: Optional[np.ndarray] = None,
    brain_mask: Optional[np.ndarray] = None,
    min_lesion_size: float = MIN_LESION_SIZE_MM3,
) -> Tuple[ScanRow, List[LesionRow]]:
    """The report of one scan from arrays in its own voxel grid.

    Args:
        mask: lesion mask (nonzero = lesion).
        affine: the scan's voxel-to-world affine (4x4).
        scan: the name written in the rows.
        probability: optional probability map of the same shape (``max_probability`` per lesion).
        brain_mask: optional brain mask of the same shape (brain volume and lesion load).
        min_lesion_size: mm³; components not larger are not lesions (predict's setting, default MSSEG's).

    Raises:
        ValueError: an array whose shape differs from the mask's.
    """
    mask = np.asarray(mask) != 0
    for name, other in (("probability", probability), ("brain_mask", brain_mask)):
        if other is not None and np.shape(other) != mask.shape:
            raise ValueError(f"{scan}: {name} has shape {np.shape(other)}, the mask {mask.shape}")
    spacing = voxel_size(affine)
    voxel_mm3 = float(np.prod(spacing))
    labels, n = label_lesions(mask, spacing, min_lesion_size)
    index = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centroids = np.zeros((0, 3))
    maxima = np.full(n, math.nan)
    if n:
        # Mean voxel index per lesion from sums of integer indices: exact in float64.
        coordinates = np.nonzero(labels)
        ids = labels[coordinates]
        sums = [np.bincount(ids, weights=axis_index.astype(np.float64), minlength=n + 1)[1:] for axis_index in coordinates]
        centroids = np.stack(sums, axis=1) / counts[:, None]
        if probability is not None:
            maxima = maximum_per_component(np.asarray(probability)[coordinates], ids)
    world = apply_affine(np.asarray(affine, dtype=np.float64), centroids) if n else centroids
    lesions = [
        LesionRow(scan, int(i), int(c), float(c) * voxel_mm3, float(w[0]), float(w[1]), float(w[2]), float(m))
        for i, c, w, m in zip(index, counts, world, maxima)
    ]
    lesion_volume_mm3 = float(counts.sum()) * voxel_mm3
    row = ScanRow(scan, n, lesion_volume_mm3 / 1000.0)
    if brain_mask is not None:
        row = with_brain_volume(row, float(np.count_nonzero(brain_mask)) * voxel_mm3)
    return row, lesions


def with_brain_volume(row: ScanRow, brain_mm3: float) -> ScanRow:
    """``row`` with its brain volume and the lesion load as a share of it (NaN for an empty brain).

    Example:
        >>> with_brain_volume(ScanRow("s", 2, 1.5), 1_200_000.0).lesion_load_percent_of_brain
        0.125
    """
    load = 100.0 * row.lesion_volume_ml * 1000.0 / brain_mm3 if brain_mm3 > 0 else math.nan
    return replace(row, brain_volume_ml=brain_mm3 / 1000.0, lesion_load_percent_of_brain=load)


def report_from_files(
    mask: str | os.PathLike,
    probability: Optional[str | os.PathLike] = None,
    brain_mask: Optional[str | os.PathLike] = None,
    scan: Optional[str] = None,
    min_lesion_size: float = MIN_LESION_SIZE_MM3,
) -> Tuple[ScanRow, List[LesionRow]]:
    """:func:`scan_lesion_report` of NIfTI files (the mask's affine); ``scan`` defaults to the mask's name.

    Raises:
        InputError: an unreadable file, or a probability/brain mask on another grid than the mask.
    """
    mask_data, mask_image = read_volume(mask)
    extras = {}
    for name, path in (("probability", probability), ("brain_mask", brain_mask)):
        if path is None:
            continue
        data, image = read_volume(path)
        if data.shape != mask_data.shape or not np.allclose(image.affine, mask_image.affine, rtol=0, atol=1e-4):
            raise InputError(path, f"not on the grid of {Path(mask).name} (shape {data.shape} vs {mask_data.shape} or another affine)")
        extras[name] = data
    return scan_lesion_report(mask_data, mask_image.affine, scan if scan is not None else Path(mask).name,
                              min_lesion_size=min_lesion_size, **extras)


def summarize(scans: Sequence[ScanRow]) -> Dict[str, float]:
    """Folder totals: scans, scans with lesions, lesions, total and mean lesion volume (mL).

    Example:
        >>> summarize([ScanRow("a", 2, 1.5), ScanRow("b", 0, 0.0)])
        {'scans': 2, 'scans_with_lesions': 1, 'lesions': 2, 'lesion_volume_ml_total': 1.5, 'lesion_volume_ml_mean': 0.75}
    """
    total = float(sum(row.lesion_volume_ml for row in scans))
    return {
        "scans": len(scans),
        "scans_with_lesions": sum(1 for row in scans if row.lesion_count > 0),
        "lesions": int(sum(row.lesion_count for row in scans)),
        "lesion_volume_ml_total": total,
        "lesion_volume_ml_mean": total / len(scans) if scans else math.nan,
    }


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_report_csvs(out_dir: str | os.PathLike, scans: Sequence[ScanRow], lesions: Sequence[LesionRow]) -> Dict[str, Path]:
    """Write :data:`SCANS_CSV`, :data:`LESIONS_CSV` and :data:`SUMMARY_CSV` into ``out_dir``, atomically.

    Floats are written in full (``repr``) precision; unknown values (no brain mask, no
    probability map) are empty cells.

    Returns:
        ``{"scans": path, "lesions": path, "summary": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def cells(row) -> List[object]:
        return ["" if isinstance(value, float) and math.isnan(value) else value for value in asdict(row).values()]

    summary = summarize(scans)
    paths = {"scans": out / SCANS_CSV, "lesions": out / LESIONS_CSV, "summary": out / SUMMARY_CSV}
    atomic_write_text(paths["scans"], _csv_text([f.name for f in fields(ScanRow)], [cells(row) for row in scans]))
    atomic_write_text(paths["lesions"], _csv_text([f.name for f in fields(LesionRow)], [cells(row) for row in lesions]))
    atomic_write_text(paths["summary"], _csv_text(list(summary), [["" if isinstance(v, float) and math.isnan(v) else v for v in summary.values()]]))
    return paths
