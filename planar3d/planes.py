"""Choose the planar axis from a scan's voxel spacing.

The planar kernel should lie in the plane of the two finest axes, i.e. ``plane_axis`` (the axis
the kernel is flat along) is the coarsest one: a 0.72 x 0.72 x 4 mm clinical FLAIR gets planes
normal to the 4 mm axis, so each kernel sees one acquired slice, as a radiologist reads it.

For (near-)isotropic scans no axis stands out; the documented default is the array's last axis
(``DEFAULT_PLANE_AXIS = 2``, NIfTI k), which is the slice axis of most axial acquisitions and,
after reorientation to RAS, the inferior-superior axis: planes are then axial, as in the paper.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_PLANE_AXIS = 2
ISOTROPY_TOLERANCE = 0.2
"""Spacings within 20 % of each other count as isotropic (1.0 vs 1.2 mm: isotropic)."""


def plane_axis_from_spacing(
    spacing: Sequence[float], default: int = DEFAULT_PLANE_AXIS, tolerance: float = ISOTROPY_TOLERANCE
) -> int:
    """Spatial axis normal to the planar kernels for a scan with this voxel spacing.

    Args:
        spacing: voxel size along array axes 0, 1, 2 in mm (e.g. ``img.header.get_zooms()[:3]``).
        default: the axis used when the coarsest axis is not coarser than the second coarsest by
            more than ``tolerance`` (relative).
        tolerance: relative margin for calling a scan isotropic.

    Returns:
        0, 1 or 2.

    Example:
        >>> plane_axis_from_spacing((0.72, 0.72, 4.0))
        2
        >>> plane_axis_from_spacing((4.0, 0.9, 0.9))
        0
        >>> plane_axis_from_spacing((1.0, 1.0, 1.0))
        2
    """
    values = [float(s) for s in spacing][:3]
    if len(values) != 3 or any(not s > 0 for s in values):
        raise ValueError(f"spacing must be three positive numbers, got {tuple(spacing)}")
    if default not in (0, 1, 2):
        raise ValueError(f"default must be 0, 1 or 2, got {default}")
    order = sorted(range(3), key=lambda axis: values[axis])
    coarsest, second = order[2], order[1]
    if values[coarsest] > values[second] * (1.0 + tolerance):
        return coarsest
    return default


def is_thick_slice(spacing: Sequence[float], plane_axis: int, ratio: float = 2.0) -> bool:
    """True when the slice axis is at least ``ratio`` times coarser than the in-plane axes.

    Such scans have too few slices to pool across them at every level; networks for them use
    in-plane pooling (see ``PlanarResUNet(pool_across_planes=...)``).
    """
    in_plane = [float(s) for axis, s in enumerate(spacing[:3]) if axis != plane_axis]
    return float(spacing[plane_axis]) >= ratio * max(in_plane)
