"""Intensity and resolution augmentation wide enough for other scanners.

Why: a network trained on a few hosts learns their contrast, sharpness, slice thickness and
bias field. New patients come from other scanners: 2D clinical FLAIR with 3-6 mm slices, other
TR/TE/TI (so another lesion-to-white-matter contrast), other coils. Each transform below
imitates one of these differences; together they replace the narrow gamma/bias/noise of the
first recipe. All act on the image only: the lesion mask is not changed by a change of scanner.

Intensities are normalised before augmentation (white matter at ``white_matter_value``), and
prediction normalises the same way, so no transform here rescales the whole image; they change
contrast *between* tissues, resolution and smooth/noisy components.

:func:`scanner_augmentation` returns the MONAI dictionary transforms for a
:class:`ScannerAugmentation` parameter set (each transform with its own probability; a
probability of 0 leaves the transform out). The thick-slice simulation is written here
(:func:`simulate_thick_slices`, :class:`RandThickSliced`) because MONAI's
``RandSimulateLowResolutiond`` zooms all axes alike, and a 2D acquisition is coarse along one
axis only.

Example:
    >>> import numpy as np
    >>> transforms = scanner_augmentation(ScannerAugmentation(), plane_axis=2)
    >>> [type(t).__name__ for t in transforms]  # doctest: +NORMALIZE_WHITESPACE
    ['RandThickSliced', 'RandGaussianSmoothd', 'RandBiasFieldd', 'FiniteRandHistogramShiftd',
     'RandAdjustContrastd', 'RandGaussianNoised']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable, RandHistogramShiftd


@dataclass(frozen=True)
class ScannerAugmentation:
    """Parameters of :func:`scanner_augmentation` (probabilities are per transform, per patch).

    Attributes:
        thick_slice_prob: probability of simulating a thick-slice (2D) acquisition.
        thick_slice_factor: range of the slice-thickness factor (2-5: 1 mm becomes 2-5 mm,
            the clinical 2D FLAIR range).
        thick_slice_axis: ``"plane"`` (the network's plane axis, the slice direction of the
            scans it will read) or ``"any"`` (one of the three axes at random).
        thick_slice_max_mm: with a voxel spacing in the data (``spacing_key``), the factor is
            capped so the simulated slice is at most this thick (a 3 mm scan is not made 15 mm).
        blur_prob, blur_sigma: Gaussian blur (sigma range in voxels, every axis).
        bias_field_prob, bias_field_coeff: smooth multiplicative field (degree-3 polynomial,
            coefficients in ``[0, bias_field_coeff]``), coil inhomogeneity.
        histogram_prob, histogram_control_points: random monotone remapping of the intensity
            histogram (MONAI ``RandHistogramShiftd``): another lesion/grey/white contrast.
        gamma_prob, gamma_range: gamma on the intensity range, mean and std kept.
        noise_prob, noise_std: additive Gaussian noise (std drawn up to ``noise_std``; white
            matter is 0.5, so 0.05 is 10 % of it).
    """

    thick_slice_prob: float = 0.25
    thick_slice_factor: Tuple[float, float] = (2.0, 5.0)
    thick_slice_axis: str = "plane"
    thick_slice_max_mm: float = 6.0
    blur_prob: float = 0.2
    blur_sigma: Tuple[float, float] = (0.25, 1.0)
    bias_field_prob: float = 0.3
    bias_field_coeff: float = 0.5
    histogram_prob: float = 0.3
    histogram_control_points: Tuple[int, int] = (5, 10)
    gamma_prob: float = 0.3
    gamma_range: Tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.2
    noise_std: float = 0.05

    def __post_init__(self):
        for name in ("thick_slice_prob", "blur_prob", "bias_field_prob", "histogram_prob", "gamma_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        low, high = self.thick_slice_factor
        if not 1.0 <= low <= high:
            raise ValueError(f"thick_slice_factor must be a range with 1 <= low <= high, got {self.thick_slice_factor!r}")
        if self.thick_slice_axis not in ("plane", "any"):
            raise ValueError(f"thick_slice_axis must be 'plane' or 'any', got {self.thick_slice_axis!r}")


def simulate_thick_slices(image, axis: int, factor: float):
    """Average ``image`` over slabs ``factor`` voxels thick along ``axis``, then interpolate back.

    The box average is the slice profile of a thick 2D acquisition; linear interpolation back to
    the same grid is what reading such a scan on a finer grid gives. Other axes are unchanged
    (an interpolation to the same size along them is the identity).

    Args:
        image: channel-first ``(C, X, Y, Z)`` numpy array or torch tensor.
        axis: spatial axis (0, 1 or 2).
        factor: slice-thickness factor (>= 1; 1 returns the image unchanged).

    Returns:
        Same type, shape and dtype as ``image``.
    """
    if factor < 1.0:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    is_numpy = isinstance(image, np.ndarray)
    tensor = torch.as_tensor(image)
    dtype = tensor.dtype
    shape = tuple(tensor.shape[1:])
    low = list(shape)
    low[axis] = max(1, int(round(shape[axis] / factor)))
    if low[axis] == shape[axis]:
        return image
    x = tensor[None].float()
    x = F.interpolate(x, size=low, mode="area")
    x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0].to(dtype)
    if is_numpy:
        return x.numpy()
    if hasattr(image, "copy_meta_from"):  # MetaTensor: keep its metadata
        out = image.clone()
        out.data.copy_(x)
        return out
    return x


#: A thickness factor capped below this is not a thick-slice acquisition any more: skipped.
MIN_THICKNESS_FACTOR = 1.5


def capped_thickness_factor(factor: float, spacing_mm: float, max_thickness_mm: float) -> Optional[float]:
    """``factor`` capped so the simulated slice is at most ``max_thickness_mm`` thick along an axis
    of ``spacing_mm`` voxels; ``None`` (skip the simulation) when that cap is below
    :data:`MIN_THICKNESS_FACTOR` (the scan is already about that thick).

    >>> capped_thickness_factor(4.0, 1.0, 6.0), capped_thickness_factor(4.0, 3.0, 6.0), capped_thickness_factor(4.0, 5.0, 6.0)
    (4.0, 2.0, None)
    """
    cap = float(max_thickness_mm) / float(spacing_mm)
    if cap < MIN_THICKNESS_FACTOR:
        return None
    return min(float(factor), cap)


class RandThickSliced(Randomizable, MapTransform):
    """With probability ``prob``, :func:`simulate_thick_slices` on ``keys`` (images only).

    Args:
        keys: image keys (never the label: the lesion mask does not change with the scanner).
        axis: the slice axis, or ``None`` for one of the three axes drawn per call.
        factor_range: range the factor is drawn from (uniform).
        prob: probability of applying.
        spacing_key: optional key of the voxel spacing (mm, same axis order); with it the
            factor is capped at ``max_thickness_mm / spacing[axis]`` and the transform is
            skipped when that cap is below 1.5.
        max_thickness_mm: see ``spacing_key``.
    """

    def __init__(self, keys, axis: Optional[int], factor_range: Sequence[float] = (2.0, 5.0), prob: float = 0.25,
                 spacing_key: Optional[str] = None, max_thickness_mm: float = 6.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.axis, self.prob = axis, float(prob)
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        self.spacing_key, self.max_thickness_mm = spacing_key, float(max_thickness_mm)
        self._do, self._axis, self._factor = False, 0, 1.0

    def randomize(self, data=None) -> None:
        # always draw the same number of values, so the stream does not depend on the outcome
        self._do = self.R.rand() < self.prob
        drawn_axis = int(self.R.randint(3))
        self._axis = drawn_axis if self.axis is None else int(self.axis)
        self._factor = float(self.R.uniform(*self.factor_range))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        out = dict(data)
        if not self._do:
            return out
        factor: Optional[float] = self._factor
        if self.spacing_key is not None and self.spacing_key in data:
            spacing = float(np.asarray(data[self.spacing_key]).reshape(-1)[self._axis])
            factor = capped_thickness_factor(self._factor, spacing, self.max_thickness_mm)
            if factor is None:
                return out
        for key in self.key_iterator(out):
            out[key] = simulate_thick_slices(out[key], self._axis, factor)
        return out


class FiniteRandHistogramShiftd(RandHistogramShiftd):
    """MONAI's ``RandHistogramShiftd``, returning the input image where the shift is not finite.

    Why: MONAI maps the control points through the patch's intensity range and divides by their
    spacing; on a nearly constant patch (a skull-stripped background patch after thick-slice
    resampling: a range of ~1e-7) the spacings round to 0 in float32 and the whole patch becomes
    NaN (measured: epoch 6 of a training run on the 1 mm host stopped with a NaN loss, traced to
    this transform). Such a patch has no histogram to shift. The random draws are consumed as
    before, so the stream of the following transforms does not change.
    """

    def __call__(self, data):
        out = super().__call__(data)
        for key in self.key_iterator(dict(out)):
            if not torch.isfinite(torch.as_tensor(out[key])).all():
                out = dict(out)
                out[key] = data[key]
        return out


def scanner_augmentation(params: ScannerAugmentation, plane_axis: int, keys: Sequence[str] = ("image",),
                         spacing_key: Optional[str] = None) -> list:
    """The scanner-variation transforms for ``params`` (resolution first, noise last).

    Args:
        params: probabilities and ranges.
        plane_axis: the network's plane axis (RAS order): the slice axis of simulated thick
            slices when ``params.thick_slice_axis == "plane"``.
        keys: image keys; labels are never passed to these transforms.
        spacing_key: optional data key of the voxel spacing (caps the slice thickness).
    """
    from monai.transforms import RandAdjustContrastd, RandBiasFieldd, RandGaussianNoised, RandGaussianSmoothd

    keys = tuple(keys)
    p = params
    out: list = []
    if p.thick_slice_prob > 0:
        axis = plane_axis if p.thick_slice_axis == "plane" else None
        out.append(RandThickSliced(keys, axis, p.thick_slice_factor, p.thick_slice_prob, spacing_key, p.thick_slice_max_mm))
    if p.blur_prob > 0:
        sigma = tuple(p.blur_sigma)
        out.append(RandGaussianSmoothd(keys, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=p.blur_prob))
    if p.bias_field_prob > 0:
        out.append(RandBiasFieldd(keys, coeff_range=(0.0, p.bias_field_coeff), prob=p.bias_field_prob))
    if p.histogram_prob > 0:
        out.append(FiniteRandHistogramShiftd(keys, num_control_points=tuple(p.histogram_control_points), prob=p.histogram_prob))
    if p.gamma_prob > 0:
        out.append(RandAdjustContrastd(keys, prob=p.gamma_prob, gamma=tuple(p.gamma_range), retain_stats=True))
    if p.noise_prob > 0:
        out.append(RandGaussianNoised(keys, prob=p.noise_prob, std=p.noise_std))
    return out
