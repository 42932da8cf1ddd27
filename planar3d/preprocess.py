"""Preprocessing shared by training and prediction: exact reorientation and intensity scaling.

Both steps are pure numpy, deterministic, and recorded in every checkpoint so prediction
repeats exactly what training did.

**Reorientation** (:class:`Reorientation`) permutes and flips voxel axes so the array is in RAS+
order (nibabel's ``io_orientation``). No interpolation happens, so the inverse gives back the
original voxel order exactly: a mask predicted in RAS is written in the scan's own grid voxel for
voxel.

**Intensity normalisation** (:func:`normalize_intensity`) is robust to skull, scalp and
background in raw (not brain-extracted) FLAIR:

1. the head is found as the voxels above an Otsu threshold of the whole volume;
2. ``lower`` and ``upper`` percentiles (default 0.5 and 99.5) are taken over head voxels only,
   so the amount of air in the field of view does not matter;
3. intensities are mapped linearly so those percentiles become 0 and 1, clipped to ``clip``
   (default [-0.2, 2.0]: hyperintense lesions above the 99.5th percentile keep their contrast);
4. the result is standardised with ImageNet's grey-level statistics (``(g - 0.449) / 0.226``,
   the mean of torchvision's per-channel means and stds), the scale the VGG-16 weights expect.
   One mean/std for all three channels keeps the summed 1-channel stem exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import nibabel as nib
import numpy as np
from nibabel import orientations

CANONICAL_AXCODES = ("R", "A", "S")


@dataclass(frozen=True)
class NormalizationConfig:
    """Parameters of :func:`normalize_intensity` (stored in checkpoints)."""

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    clip_low: float = -0.2
    clip_high: float = 2.0
    mean: float = 0.449
    std: float = 0.226

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, float]) -> "NormalizationConfig":
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown normalisation keys: {', '.join(unknown)}")
        return cls(**values)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (maximises the between-class variance of a histogram)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_below = np.cumsum(counts)
    weight_above = weight_below[-1] - weight_below
    sum_below = np.cumsum(counts * centers)
    mean_below = sum_below / np.maximum(weight_below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    return float(edges[1:][np.argmax(between)])


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Boolean mask of the head (voxels above the volume's Otsu threshold)."""
    return volume > otsu_threshold(volume)


def normalize_intensity(volume: np.ndarray, config: NormalizationConfig = NormalizationConfig()) -> np.ndarray:
    """Scale a raw FLAIR volume as described in the module docstring; returns float32.

    Raises:
        ValueError: for a constant volume (nothing to normalise: an empty or broken scan).
    """
    volume = np.asarray(volume, dtype=np.float32)
    head = head_mask(volume)
    if not head.any():
        raise ValueError("the volume is constant: no head found to normalise intensities on")
    lower, upper = np.percentile(volume[head], [config.lower_percentile, config.upper_percentile])
    if upper <= lower:
        upper = lower + 1.0
    scaled = (volume - np.float32(lower)) / np.float32(upper - lower)
    np.clip(scaled, config.clip_low, config.clip_high, out=scaled)
    scaled -= np.float32(config.mean)
    scaled /= np.float32(config.std)
    return scaled


class Reorientation:
    """Exact axis permutation/flip between a scan's voxel order and RAS+ order.

    Args:
        affine: the scan's voxel-to-world affine.
        shape: the scan's 3D shape.

    Example:
        >>> r = Reorientation(np.diag([-2.0, 1.0, 3.0, 1.0]), (4, 5, 6))   # LAS input
        >>> a = np.arange(120).reshape(4, 5, 6)
        >>> bool(np.array_equal(r.inverse(r.forward(a)), a))
        True
    """

    def __init__(self, affine: np.ndarray, shape: Tuple[int, ...]):
        self.source_affine = np.asarray(affine, dtype=np.float64)
        self.source_shape = tuple(int(s) for s in shape[:3])
        source = orientations.io_orientation(self.source_affine)
        target = orientations.axcodes2ornt(CANONICAL_AXCODES)
        self._forward = orientations.ornt_transform(source, target)
        self._inverse = orientations.ornt_transform(target, source)
        self.affine = self.source_affine @ orientations.inv_ornt_aff(self._forward, self.source_shape)
        self.shape = self.forward(np.empty(self.source_shape, dtype=np.uint8)).shape

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size (mm) along the RAS-ordered axes."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self._forward, [[0, 1], [1, 1], [2, 1]]))

    def forward(self, array: np.ndarray) -> np.ndarray:
        """Scan voxel order -> RAS order (a view when possible; spatial axes first)."""
        return orientations.apply_orientation(array, self._forward)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """RAS order -> the scan's own voxel order."""
        return orientations.apply_orientation(array, self._inverse)

    @classmethod
    def of_image(cls, image: nib.Nifti1Image) -> "Reorientation":
        return cls(image.affine, image.shape)
