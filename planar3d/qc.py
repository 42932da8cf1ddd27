"""Quality-control pictures: FLAIR slices with mask contours, and training curves.

Everything is drawn with matplotlib's Agg backend (no display needed) and written atomically.

Example:
    >>> save_overlay_png(flair, {"reference": ref, "prediction": pred}, (1.0, 1.0, 3.0),
    ...                  plane_axis=2, path="qc/case01.png")   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from planar3d.errors import InputError
from planar3d.io import atomic_write

#: Contour colours, in the order of the masks given.
COLOURS = ("#00e000", "#ff2020", "#20a0ff", "#ffd000", "#ff40ff")
PANEL_INCHES = 4.0
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def choose_slices(masks: Sequence[np.ndarray], plane_axis: int, n_slices: int = 3) -> List[int]:
    """Indices of the slices normal to ``plane_axis`` with the most lesion voxels.

    Voxels are counted in the union of ``masks``. Ties go to the lower index; when every mask is
    empty, the ``n_slices`` slices around the middle are returned. The result is sorted ascending
    and has ``min(n_slices, number of slices)`` entries.

    Example:
        >>> m = np.zeros((4, 4, 5), bool); m[:, :, 1] = True; m[0, 0, 3] = True
        >>> choose_slices([m], plane_axis=2, n_slices=2)
        [1, 3]
    """
    if not masks:
        raise ValueError("choose_slices needs at least one mask")
    union = np.zeros(np.shape(masks[0]), bool)
    for mask in masks:
        union |= np.asarray(mask).astype(bool, copy=False)
    other_axes = tuple(axis for axis in range(union.ndim) if axis != plane_axis)
    counts = union.sum(axis=other_axes)
    n = min(n_slices, counts.size)
    if counts.sum() == 0:
        start = max(0, min(counts.size - n, counts.size // 2 - n // 2))
        return list(range(start, start + n))
    order = np.argsort(-counts, kind="stable")[:n]
    return sorted(int(index) for index in order)


def robust_window(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Display range from the ``low`` and ``high`` percentiles (never an empty range)."""
    vmin, vmax = (float(v) for v in np.percentile(np.asarray(image, dtype=float), [low, high]))
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def save_overlay_png(
    flair: np.ndarray | None,
    masks: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    plane_axis: int,
    path: str | os.PathLike,
    n_slices: int = 3,
) -> List[int]:
    """Draw the slices with the most lesion, FLAIR in grey and each mask as a coloured contour.

    Args:
        flair: the image (3D, voxel order) or None for a black background.
        masks: named binary masks of the same shape, e.g. ``{"reference": r, "prediction": p}``.
        spacing: voxel size (mm) per axis, used for the physical aspect ratio.
        plane_axis: the axis normal to the drawn slices.
        path: the PNG file to write (its folder must exist).
        n_slices: how many slices, side by side (``PANEL_INCHES`` x ``PANEL_INCHES`` each at ``DPI``).

    Returns:
        The slice indices drawn (see :func:`choose_slices`).
    """
    arrays = {name: np.asarray(mask).astype(bool, copy=False) for name, mask in masks.items()}
    if not arrays:
        raise ValueError("save_overlay_png needs at least one mask")
    shape = next(iter(arrays.values())).shape
    if flair is None:
        flair = np.zeros(shape, np.float32)
    flair = np.asarray(flair)
    for name, mask in arrays.items():
        if mask.shape != flair.shape:
            raise ValueError(f"mask {name!r} has shape {mask.shape}, image has {flair.shape}")
    if not 0 <= plane_axis < flair.ndim:
        raise ValueError(f"plane_axis {plane_axis} is not an axis of a {flair.ndim}D image")
    slices = choose_slices(list(arrays.values()), plane_axis, n_slices)
    col_axis, row_axis = (axis for axis in range(3) if axis != plane_axis)
    aspect = float(spacing[row_axis]) / float(spacing[col_axis])
    vmin, vmax = robust_window(flair)

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(slices), figsize=(PANEL_INCHES * len(slices), PANEL_INCHES), squeeze=False)
    try:
        for ax, index in zip(axes[0], slices):
            # transpose so the first remaining axis runs horizontally, origin at the bottom left
            picture = np.take(flair, index, axis=plane_axis).T
            ax.imshow(picture, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect, interpolation="nearest")
            for colour, (name, mask) in zip(COLOURS * len(arrays), arrays.items()):
                section = np.take(mask, index, axis=plane_axis).T
                if section.any():
                    ax.contour(section.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
                ax.plot([], [], color=colour, label=name)
            ax.set_title(f"axis {plane_axis}, slice {index}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][0].legend(loc="upper right", fontsize=7, framealpha=0.6)
        figure.tight_layout()
        with atomic_write(path, "wb") as stream:
            figure.savefig(stream, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return slices


def read_metrics_csv(metrics_csv: str | os.PathLike) -> Dict[str, np.ndarray]:
    """Numeric columns of a training log CSV (needs an ``epoch`` column); others are ignored.

    Raises:
        InputError: missing or unreadable file, no ``epoch`` column, no rows.
    """
    path = Path(metrics_csv)
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as error:
        raise InputError(path, f"cannot read the metrics CSV ({error})") from None
    if not rows or "epoch" not in rows[0]:
        raise InputError(path, "expected a CSV with a header including 'epoch' and at least one row")
    columns: Dict[str, np.ndarray] = {}
    for name in rows[0]:
        try:
            columns[name] = np.array([float(row[name]) if row[name] not in ("", None) else np.nan for row in rows])
        except ValueError:
            if name == "epoch":
                raise InputError(path, "column 'epoch' is not numeric") from None
    return columns


def plot_training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> List[str]:
    """Plot every numeric column against ``epoch``: losses on the left, the rest on the right.

    Returns:
        The names of the columns plotted.
    """
    columns = read_metrics_csv(metrics_csv)
    epoch = columns.pop("epoch")
    losses = [name for name in columns if "loss" in name.lower()]
    others = [name for name in columns if name not in losses]
    groups = [group for group in (losses, others) if group]
    if not groups:
        raise InputError(metrics_csv, "no numeric column besides 'epoch' to plot")
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(groups), figsize=(5.0 * len(groups), 4.0), squeeze=False)
    try:
        for ax, group, label in zip(axes[0], groups, ("loss" if losses else "value", "value")):
            for name in group:
                ax.plot(epoch, columns[name], marker=".", label=name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figure.tight_layout()
        with atomic_write(path, "wb") as stream:
            figure.savefig(stream, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return losses + others
