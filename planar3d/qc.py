"""Quality-control pictures: FLAIR slices with mask contours, and training curves.

Everything is drawn with matplotlib's Agg backend (no display needed) and written atomically.
One display convention for predict and evaluate: arrays are put in RAS+ order from the scan's
affine (:func:`to_ras_display`), so every picture has the patient's left on the left edge,
anterior/superior at the top, and the edges labelled L/R/A/P/S/I. Contours use the Okabe-Ito
colour-blind-safe palette and a line style per mask (reference solid blue, prediction dashed
orange), so the two stay apart without colour vision.

Example:
    >>> save_ras_overlay_png(flair, {"reference": ref, "prediction": pred}, image.affine,
    ...                      "qc/case01.png")   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from planar3d.errors import InputError
from planar3d.io import atomic_write

#: Okabe-Ito colours (colour-blind safe) for masks without a style of their own, in order.
COLOURS = ("#56B4E9", "#E69F00", "#009E73", "#F0E442", "#CC79A7")
LINE_STYLES = ("solid", "dashed", "dotted", "dashdot")
#: Fixed (colour, line style) of the two masks every picture shows, the same in every picture.
MASK_STYLES = {"reference": ("#0072B2", "solid"), "prediction": ("#E69F00", "dashed")}
#: Lesion-voxel quantiles (percent) along the slice axis between which the drawn slices sit.
SLICE_QUANTILE_RANGE = (20.0, 80.0)
RAS = ("R", "A", "S")
#: Name of the slices normal to each RAS axis.
RAS_PLANE_NAMES = ("sagittal", "coronal", "axial")
OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
PANEL_INCHES = 4.0
#: Width of one training-curve panel.
PANEL_WIDTH_INCHES = 4.0
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slice_quantiles(n_slices: int) -> List[float]:
    """Quantiles (percent) for ``n_slices`` slices: 50 for one, else evenly from 20 to 80 (20/50/80 for 3)."""
    low, high = SLICE_QUANTILE_RANGE
    return [(low + high) / 2.0] if n_slices == 1 else [float(q) for q in np.linspace(low, high, n_slices)]


def choose_slices(masks: Sequence[np.ndarray], plane_axis: int, n_slices: int = 3) -> List[int]:
    """Slices normal to ``plane_axis`` spread over the lesion load, not the adjacent densest ones.

    The slices sit at the 20/50/80 % quantiles (:func:`slice_quantiles`) of the lesion voxels'
    positions along ``plane_axis`` (union of ``masks``; ``inverted_cdf``, so each is a slice that
    holds lesion). When quantiles coincide, the free places go to the other lesion slices (most
    lesion first), then to empty ones; ties go to the slice nearest the median pick, then to the
    lower index. When every mask is empty, the slices around the middle are drawn. The
    result is sorted and has ``min(n_slices, number of slices)`` distinct entries.

    Example:
        >>> m = np.zeros((4, 4, 10), bool); m[:, :, 1] = True; m[0, 0, 5] = True; m[:2, :2, 8] = True
        >>> choose_slices([m], plane_axis=2)       # 16 voxels in 1, 1 in 5, 4 in 8
        [1, 5, 8]
        >>> choose_slices([m[:, :, :3]], plane_axis=2)
        [0, 1, 2]
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
    positions = np.repeat(np.arange(counts.size), counts)
    picks = sorted({int(v) for v in np.percentile(positions, slice_quantiles(n), method="inverted_cdf")})
    centre = picks[len(picks) // 2]
    lesion_first = sorted(range(counts.size), key=lambda i: (-int(counts[i]), abs(i - centre), i))
    for index in lesion_first:
        if len(picks) >= n:
            break
        if index not in picks:
            picks.append(index)
    return sorted(picks)


def to_ras_display(flair: np.ndarray | None, masks: Mapping[str, np.ndarray], affine: np.ndarray):
    """Arrays in a scan's voxel order -> RAS+ order for display, with the RAS voxel sizes.

    The one reorientation every QC picture goes through (nibabel's orientation tools, via
    :class:`planar3d.preprocess.Reorientation`: an exact flip/permutation, no resampling).

    Returns:
        ``(flair or None, {name: mask}, spacing, axis_codes)``; ``axis_codes`` is ``("R", "A", "S")``.

    Example:
        >>> a = np.arange(24).reshape(2, 3, 4)
        >>> f, m, spacing, codes = to_ras_display(a, {"m": a > 5}, np.diag([-2.0, 1.0, 3.0, 1.0]))
        >>> int(f[0, 0, 0]), spacing, codes                # the first L->R voxel is the last stored
        (12, (2.0, 1.0, 3.0), ('R', 'A', 'S'))
    """
    from nibabel.orientations import aff2axcodes

    from planar3d.preprocess import Reorientation

    shape = np.shape(flair) if flair is not None else np.shape(next(iter(masks.values())))
    reorientation = Reorientation(affine, shape)
    flair_ras = None if flair is None else reorientation.forward(np.asarray(flair))
    masks_ras = {name: reorientation.forward(np.asarray(mask)) for name, mask in masks.items()}
    return flair_ras, masks_ras, reorientation.spacing, tuple(aff2axcodes(reorientation.affine))


def orientation_labels(axis_codes: Sequence[str], plane_axis: int) -> Dict[str, str]:
    """Edge labels of a slice normal to ``plane_axis`` as :func:`save_overlay_png` draws it.

    The first remaining axis runs left to right, the second bottom to top; an axis code names
    the direction its index grows towards (nibabel's convention: ``R`` means towards the right).

    Example:
        >>> orientation_labels(("R", "A", "S"), 2)
        {'left': 'L', 'right': 'R', 'bottom': 'P', 'top': 'A'}
        >>> orientation_labels(("R", "A", "S"), 0)
        {'left': 'P', 'right': 'A', 'bottom': 'I', 'top': 'S'}
    """
    col_axis, row_axis = (axis for axis in range(3) if axis != plane_axis)
    horizontal, vertical = axis_codes[col_axis], axis_codes[row_axis]
    return {"left": OPPOSITE[horizontal], "right": horizontal, "bottom": OPPOSITE[vertical], "top": vertical}


def mask_styles(names: Sequence[str]) -> Dict[str, tuple]:
    """``{name: (colour, line style)}``: :data:`MASK_STYLES` for reference/prediction, others in turn.

    Example:
        >>> mask_styles(["prediction", "other"])
        {'prediction': ('#E69F00', 'dashed'), 'other': ('#56B4E9', 'dotted')}
    """
    styles = {}
    free = 0
    for name in names:
        if name in MASK_STYLES:
            styles[name] = MASK_STYLES[name]
        else:
            styles[name] = (COLOURS[free % len(COLOURS)], LINE_STYLES[(free + 2) % len(LINE_STYLES)])
            free += 1
    return styles


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
    axis_codes: Sequence[str] | None = None,
) -> List[int]:
    """Draw slices spread over the lesion load, FLAIR in grey and each mask as a contour.

    Callers with an affine use :func:`save_ras_overlay_png`, which puts the arrays in the one
    display convention (RAS) first.

    Args:
        flair: the image (3D, voxel order) or None for a black background.
        masks: named binary masks of the same shape, e.g. ``{"reference": r, "prediction": p}``.
        spacing: voxel size (mm) per axis, used for the physical aspect ratio.
        plane_axis: the axis normal to the drawn slices.
        path: the PNG file to write (its folder must exist).
        n_slices: how many slices, side by side (``PANEL_INCHES`` x ``PANEL_INCHES`` each at ``DPI``).
        axis_codes: direction of each array axis (``("R", "A", "S")``); when given, the slice
            edges are labelled (:func:`orientation_labels`).

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
    styles = mask_styles(list(arrays))
    labels = orientation_labels(axis_codes, plane_axis) if axis_codes is not None else None

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(slices), figsize=(PANEL_INCHES * len(slices), PANEL_INCHES), squeeze=False)
    try:
        for ax, index in zip(axes[0], slices):
            # transpose so the first remaining axis runs horizontally, origin at the bottom left
            picture = np.take(flair, index, axis=plane_axis).T
            ax.imshow(picture, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect, interpolation="nearest")
            for name, mask in arrays.items():
                colour, style = styles[name]
                section = np.take(mask, index, axis=plane_axis).T
                if section.any():
                    ax.contour(section.astype(float), levels=[0.5], colors=[colour], linewidths=1.5, linestyles=[style])
                ax.plot([], [], color=colour, linestyle=style, linewidth=1.5, label=name)
            if labels is not None:
                for where, (x, y, ha, va) in {"left": (0.01, 0.5, "left", "center"), "right": (0.99, 0.5, "right", "center"),
                                              "bottom": (0.5, 0.01, "center", "bottom"), "top": (0.5, 0.99, "center", "top")}.items():
                    ax.text(x, y, labels[where], transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=10,
                            fontweight="bold", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.0, "edgecolor": "none"})
            if axis_codes is not None and tuple(axis_codes) == RAS:
                ax.set_title(f"{RAS_PLANE_NAMES[plane_axis]} slice {index} (RAS)", fontsize=9)
            else:
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


def save_ras_overlay_png(
    flair: np.ndarray | None,
    masks: Mapping[str, np.ndarray],
    affine: np.ndarray,
    path: str | os.PathLike,
    plane_axis: int | None = None,
    n_slices: int = 3,
) -> List[int]:
    """:func:`save_overlay_png` in the one display convention: arrays in ``affine``'s voxel order
    are shown in RAS+ order with L/R/A/P/S/I labels.

    Args:
        plane_axis: the RAS axis normal to the slices (0 sagittal, 1 coronal, 2 axial); default:
            the thickest-voxel axis (:func:`planar3d.planes.plane_axis_from_spacing`).

    Returns:
        The RAS slice indices drawn.
    """
    flair_ras, masks_ras, spacing, codes = to_ras_display(flair, masks, affine)
    if plane_axis is None:
        from planar3d.planes import plane_axis_from_spacing

        plane_axis = plane_axis_from_spacing(spacing)
    return save_overlay_png(flair_ras, masks_ras, spacing, plane_axis, path, n_slices, axis_codes=codes)


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


#: Panels of :func:`plot_training_curves`: (title, y-axis label, test on a lower-case column name).
PANELS = (
    ("loss", "loss", lambda name: "loss" in name),
    ("validation scores", "score (0-1)", lambda name: any(key in name for key in (
        "dice", "f1", "sensitivity", "ppv", "precision", "recall", "iou", "jaccard", "threshold"))),
    ("throughput", "voxels/s", lambda name: "per_second" in name or "per_s" in name or "throughput" in name),
)


def training_panels(names: Sequence[str]) -> List[tuple]:
    """Group metric columns into panels so that no two scales share an axis.

    Losses, 0-1 validation scores and throughput get a panel each (in that order, when
    present); every other column (learning rate, seconds, ...) gets its own.

    Example:
        >>> [(title, cols) for title, _, cols in training_panels(
        ...     ["train_loss", "val_dice", "val_threshold", "lr", "seconds", "voxels_per_second"])]
        [('loss', ['train_loss']), ('validation scores', ['val_dice', 'val_threshold']), ('throughput', ['voxels_per_second']), ('lr', ['lr']), ('seconds', ['seconds'])]
    """
    panels, taken = [], set()
    for title, label, belongs in PANELS:
        columns = [name for name in names if name not in taken and belongs(name.lower())]
        taken.update(columns)
        if columns:
            panels.append((title, label, columns))
    panels += [(name, name, [name]) for name in names if name not in taken]
    return panels


def plot_training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> List[tuple]:
    """Plot the numeric columns against ``epoch``, one panel per scale (:func:`training_panels`).

    The validation-score panel is drawn on 0-1, throughput in voxels/s on its own axis.

    Returns:
        The panels drawn: ``[(title, [column, ...]), ...]``.
    """
    columns = read_metrics_csv(metrics_csv)
    epoch = columns.pop("epoch")
    panels = training_panels(list(columns))
    if not panels:
        raise InputError(metrics_csv, "no numeric column besides 'epoch' to plot")
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(PANEL_WIDTH_INCHES * len(panels), 4.0), squeeze=False)
    try:
        for ax, (title, label, group) in zip(axes[0], panels):
            for colour, name in zip(COLOURS * len(group), group):
                ax.plot(epoch, columns[name], marker=".", color=colour, label=name)
            if title == "validation scores":
                ax.set_ylim(0.0, 1.0)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figure.tight_layout()
        with atomic_write(path, "wb") as stream:
            figure.savefig(stream, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return [(title, group) for title, _, group in panels]
