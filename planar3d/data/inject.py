"""Place real lesion shapes into a real FLAIR scan.

Lesion masks (for example the MSLUB consensus masks, which share the MNI grid of one labelled
FLAIR) are painted into a host FLAIR with a multiplicative blend: inside the lesion the host is
multiplied by a factor that brings its local mean up to a drawn lesion intensity, with a smooth
texture and soft edges, so the host's own noise pattern is kept; outside the injected masks the
host is left exactly unchanged.

Example:
    >>> flair, label = inject_lesions(host, affine, [mask_a, mask_b], np.random.default_rng(0))
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from planar3d.errors import InputError
from planar3d.io import read_volume, voxel_size
from planar3d.preprocess import otsu_threshold, white_matter_level

LESION_CONTRAST = (1.3, 1.8)
"""Default range of an injected lesion's level, as a factor of the host's white-matter level."""

EDGE_RAMP_MM = 2.0
"""With ``edge_contrast``: depth (mm beyond the outermost voxels) over which a lesion's contrast
rises from its edge's share to the full level."""


def head_mask(flair: np.ndarray) -> np.ndarray:
    """Foreground (head or brain) of a FLAIR: above half the Otsu threshold, holes filled."""
    flair = np.asarray(flair, dtype=np.float32)
    positive = flair[flair > 0]
    if positive.size == 0:
        return np.zeros(flair.shape, bool)
    threshold = 0.5 * otsu_threshold(positive)
    return ndimage.binary_fill_holes(flair > threshold)


def inject_lesions(
    host_flair: np.ndarray,
    host_affine: np.ndarray,
    lesion_masks: list[np.ndarray],
    rng: np.random.Generator,
    host_label: np.ndarray | None = None,
    intensity: str | float = "auto",
    contrast: tuple[float, float] = LESION_CONTRAST,
    edge_contrast: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint lesion masks (already on the host grid) into a host FLAIR.

    The lesion intensity is drawn from the host's own lesions when ``host_label`` has any
    (their mean times 0.9-1.1, texture from their spread), else it is the white-matter level
    times a factor drawn uniformly in ``contrast`` (``intensity="auto"``; :data:`LESION_CONTRAST`,
    1.3-1.8, by default) or times ``intensity`` if a number.
    Voxels outside the host's head/brain mask are never changed; nor is any voxel outside the
    injected masks (exactly). Inside, the host is multiplied by a factor of at least 1.

    Args:
        host_flair: host FLAIR array.
        host_affine: its 4x4 voxel-to-world affine (kept for the record; the masks must already
            be on the host grid).
        lesion_masks: binary arrays with the host's shape.
        rng: random generator; the same state gives the same result.
        host_label: the host's own lesion label, or None.
        intensity: ``"auto"`` or a factor of the white-matter level.
        contrast: ``(low, high)``, ``0 < low <= high``: the range of the factor ``"auto"`` draws
            (one draw whatever the range, so the other draws of ``rng`` do not change).
        edge_contrast: None (the default: full contrast up to a soft one-voxel edge), or the
            share in ``[0, 1]`` of the lesion's contrast that its outermost voxels get, rising
            linearly to the full level over :data:`EDGE_RAMP_MM` of depth (in mm, so on thick
            slices the in-plane rim is graded): a graded lesion, its labelled rim dimmer than its
            core, with the same label. No random number is drawn for it.

    Returns:
        ``(flair float32, label uint8)``; the label is the union of the placed masks and the
        host label.

    Raises:
        ValueError: a mask or the host label does not have the host's shape, or a bad intensity
            or contrast, or an edge_contrast outside [0, 1].
    """
    host = np.asarray(host_flair, dtype=np.float32)
    if np.asarray(host_affine).shape != (4, 4):
        raise ValueError(f"host_affine must be 4x4, got shape {np.asarray(host_affine).shape}")
    for n, mask in enumerate(lesion_masks):
        if np.shape(mask) != host.shape:
            raise ValueError(f"lesion mask {n} has shape {np.shape(mask)}, the host has {host.shape}")
    if host_label is not None and np.shape(host_label) != host.shape:
        raise ValueError(f"host label has shape {np.shape(host_label)}, the host has {host.shape}")
    if intensity != "auto" and not (isinstance(intensity, (int, float)) and intensity > 0):
        raise ValueError(f"intensity must be 'auto' or a positive factor, got {intensity!r}")
    low, high = (float(v) for v in contrast)
    if not 0 < low <= high:
        raise ValueError(f"contrast must be (low, high) with 0 < low <= high, got {contrast!r}")
    if edge_contrast is not None and not 0.0 <= float(edge_contrast) <= 1.0:
        raise ValueError(f"edge_contrast must be in [0, 1], got {edge_contrast!r}")

    foreground = head_mask(host)
    injected = np.zeros(host.shape, bool)
    for mask in lesion_masks:
        injected |= np.asarray(mask) > 0
    injected &= foreground
    own = np.zeros(host.shape, bool) if host_label is None else np.asarray(host_label) > 0
    label = (injected | own).astype(np.uint8)

    if own.any():
        own_values = host[own]
        level = float(own_values.mean()) * rng.uniform(0.9, 1.1)
        cv = float(own_values.std() / max(own_values.mean(), 1e-6))
    else:
        wm, spread = white_matter_level(np.where(foreground, host, 0))
        factor = rng.uniform(low, high) if intensity == "auto" else float(intensity)
        level = wm * factor
        cv = min(0.15, spread / max(wm, 1e-6))
    texture_cv = 0.5 * cv
    out = host.copy()
    if not injected.any():
        return out, label

    # Work in the bounding box of the injected voxels (plus a margin for the smoothing).
    where = np.argwhere(injected)
    lo = np.maximum(where.min(0) - 4, 0)
    hi = np.minimum(where.max(0) + 5, host.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    region = injected[box]
    local = ndimage.gaussian_filter(host[box], 1.5)
    soft = ndimage.gaussian_filter(region.astype(np.float32), 0.7)
    soft = np.clip(soft / max(float(soft[region].max()), 1e-6) * 1.6, 0, 1) * region
    texture = ndimage.gaussian_filter(rng.standard_normal(region.shape).astype(np.float32), 1.0)
    texture *= np.float32(texture_cv / max(float(texture.std()), 1e-6))
    target = np.float32(level) * (1 + texture)
    ratio = np.maximum(target / np.maximum(local, np.float32(1e-3 * max(level, 1e-6))), 1.0)
    if edge_contrast is not None:
        spacing = np.asarray(voxel_size(host_affine))
        depth = ndimage.distance_transform_edt(region, sampling=spacing)  # mm to the nearest voxel outside
        ramp = np.clip((depth - spacing.min()) / EDGE_RAMP_MM, 0.0, 1.0)
        soft = soft * (np.float32(edge_contrast) + np.float32(1.0 - edge_contrast) * ramp.astype(np.float32))
    factor = 1 + soft * (ratio - 1)
    # Negative host values (interpolation undershoot in processed scans) are left as they are.
    out[box] = np.where(region & (host[box] > 0), host[box] * factor, host[box])
    return out, label


def resample_to_host(data: np.ndarray, affine: np.ndarray, host_img: nib.Nifti1Image,
                     host_to_world: np.ndarray | None = None, order: int = 0) -> np.ndarray:
    """Resampling of ``data`` (placed by ``affine``) onto the grid of ``host_img``.

    The path is host voxel -> host world -> (``host_to_world``, e.g. from
    :func:`planar3d.data.register.register_to_host`) -> the data's world -> data voxel.
    ``order`` 0 (nearest neighbour) keeps masks binary; 1 (trilinear) suits probability maps.
    """
    world = np.eye(4) if host_to_world is None else np.asarray(host_to_world, dtype=np.float64)
    matrix = np.linalg.inv(affine) @ world @ host_img.affine
    return ndimage.affine_transform(
        data, matrix[:3, :3], offset=matrix[:3, 3], output_shape=host_img.shape[:3], order=order, mode="constant", cval=0
    )


def lesion_masks_from_folder(folder: str | Path, host_img: nib.Nifti1Image,
                             host_to_masks: np.ndarray | None = None) -> list[np.ndarray]:
    """Load every NIfTI mask of a folder onto the grid of ``host_img``.

    A mask on another grid is resampled with nearest neighbour through the two affines
    (host voxel -> world -> mask voxel), so masks in MNI space fit a host in MNI space. For a host
    in its own space, ``host_to_masks`` maps host world to the masks' world (see
    :mod:`planar3d.data.register`).

    Args:
        folder: folder of ``*.nii`` / ``*.nii.gz`` binary masks (sorted by name).
        host_img: the host image (its shape and affine define the grid).
        host_to_masks: 4x4 world-to-world matrix, or None for the identity.

    Returns:
        One uint8 array (0/1) per file, with the host's shape.

    Raises:
        InputError: the folder is missing or has no masks, or a mask cannot be read or is not 3D.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "lesion mask folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise InputError(folder, "no .nii or .nii.gz lesion masks in this folder")
    shape = host_img.shape[:3]
    masks = []
    for path in files:
        data, img = read_volume(path, dtype=None)
        binary = (data > 0).astype(np.uint8)
        if host_to_masks is None and binary.shape == shape and np.allclose(img.affine, host_img.affine, atol=1e-4):
            masks.append(binary)
            continue
        masks.append(resample_to_host(binary, img.affine, host_img, host_to_masks))
    return masks
