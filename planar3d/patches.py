"""Patch sampling and augmentation as batched tensor operations, on whatever device the tensors are.

Why: MONAI's dictionary transforms run per sample on the CPU (in DataLoader workers); on a GPU
the training step (a 16x256x256 slab forward + backward in ~16 ms) then waits for the loader.
These kernels do the same sampling and augmentation on tensors that may live on the GPU, so a
loader (``pipelines.device_batches``) can keep the preprocessed volumes there and cut, flip,
deform and perturb patches where the network runs: padding, crop starts, background draws,
in-plane affine, gamma, bias field, and the scanner augmentation's Gaussian blur (MONAI's
kernels) and histogram shift (MONAI ``RandHistogramShift``'s control points and map, with the
non-finite guard of ``FiniteRandHistogramShiftd``); thick slices are
:func:`planar3d.augment.simulate_thick_slices` itself, which works on tensors anywhere.

Every random number is drawn by the caller (on the CPU, from its own generator) and passed in as
plain numbers or small tensors (a histogram shift's control points come from
:func:`histogram_control_points` of the caller's uniforms); only the Gaussian noise field is drawn
on the device, from a generator the caller seeds. So nothing here synchronises a GPU with the host, and a caller that
seeds its generators from ``(seed, epoch, rank, step)`` gets a stream of patches that is a pure
function of those.

Each function mirrors one MONAI transform of ``pipelines.data`` and names it; the distributions
of the parameters are the caller's (``pipelines.device_batches`` draws MONAI's).

Example:
    >>> import torch
    >>> volume = torch.arange(24.0).reshape(1, 2, 3, 4)
    >>> pad_symmetric(volume, (4, 3, 4)).shape
    torch.Size([1, 4, 3, 4])
    >>> crop_start(centre=0, size=2, extent=4), crop_start(centre=3, size=2, extent=4)
    (0, 2)
"""

from __future__ import annotations

from typing import Sequence, Tuple

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Degree of the polynomial bias field (MONAI ``RandBiasField``'s default).
BIAS_FIELD_DEGREE = 3


def bias_field_terms(degree: int = BIAS_FIELD_DEGREE) -> Tuple[Tuple[int, int, int], ...]:
    """The ``(i, j, k)`` Legendre degrees of a 3D bias field, in MONAI's coefficient order.

    >>> len(bias_field_terms(3)), bias_field_terms(1)
    (20, ((0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)))
    """
    return tuple((i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j))


def pad_symmetric(volume: torch.Tensor, size: Sequence[int], mode: str = "edge") -> torch.Tensor:
    """Pad a channel-first ``(C, X, Y, Z)`` volume to at least ``size``, repeating its edge
    (``mode="edge"``) or with zeros (``mode="constant"``).

    Axes already at least that large are left alone; the padding is split ``floor`` before,
    ``ceil`` after, as MONAI ``SpatialPadd(mode=...)`` does.
    """
    if mode not in ("edge", "constant"):
        raise ValueError(f"mode must be 'edge' or 'constant', got {mode!r}")
    widths = []
    for extent, wanted in zip(reversed(volume.shape[1:]), reversed(list(size))):  # F.pad: last axis first
        missing = max(int(wanted) - int(extent), 0)
        widths += [missing // 2, missing - missing // 2]
    if not any(widths):
        return volume
    dtype = volume.dtype
    if mode == "constant":
        return F.pad(volume, widths, mode="constant", value=0)
    padded = F.pad(volume[None].float(), widths, mode="replicate")[0]
    return padded.to(dtype)


def crop_start(centre: int, size: int, extent: int) -> int:
    """First index of a ``size`` window around ``centre``, moved the least to lie in ``[0, extent)``.

    MONAI's rule (``correct_crop_centers``): the window is ``centre - size // 2`` onwards, so the
    centre voxel is always inside it.
    """
    return min(max(int(centre) - int(size) // 2, 0), int(extent) - int(size))


def background_ranks(lesion_indices: torch.Tensor) -> torch.Tensor:
    """For sorted flat lesion indices ``L``, ``L[i] - i``: the number of background voxels before each.

    With it, :func:`nth_background` finds the ``n``-th background voxel by a binary search, so a
    uniform draw over the background needs no list of (millions of) background indices.
    """
    return lesion_indices - torch.arange(len(lesion_indices), dtype=lesion_indices.dtype)


def nth_background(n: int, lesion_indices: torch.Tensor, ranks: torch.Tensor) -> int:
    """Flat index of the ``n``-th (0-based) voxel that is not in the sorted ``lesion_indices``.

    >>> import torch
    >>> lesions = torch.tensor([1, 2, 5])
    >>> [nth_background(n, lesions, background_ranks(lesions)) for n in range(5)]
    [0, 3, 4, 6, 7]
    """
    return int(n) + int(torch.searchsorted(ranks, int(n), right=True))


def legendre(degree: int, extent: int, device=None) -> torch.Tensor:
    """``(degree + 1, extent)``: Legendre polynomials ``P_0..P_degree`` on ``linspace(-1, 1, extent)``."""
    x = torch.linspace(-1.0, 1.0, extent, dtype=torch.float64, device=device)
    rows = [torch.ones_like(x), x]
    for n in range(1, degree):
        rows.append(((2 * n + 1) * x * rows[n] - n * rows[n - 1]) / (n + 1))
    return torch.stack(rows[: degree + 1]).float()


def bias_field_matrices(coefficients: torch.Tensor, degree: int = BIAS_FIELD_DEGREE) -> torch.Tensor:
    """``(B, T)`` coefficients in :func:`bias_field_terms` order -> ``(B, d+1, d+1, d+1)`` matrices
    ``c[i, j, k]`` (zero where ``i + j + k > degree``); built where ``coefficients`` are (the host)."""
    terms = bias_field_terms(degree)
    matrix = torch.zeros((coefficients.shape[0], degree + 1, degree + 1, degree + 1), dtype=torch.float32)
    i, j, k = (torch.tensor([t[a] for t in terms]) for a in range(3))
    matrix[:, i, j, k] = coefficients.float()
    return matrix


def legendre_bases(shape: Sequence[int], degree: int = BIAS_FIELD_DEGREE, device=None) -> Tuple[torch.Tensor, ...]:
    """:func:`legendre` along each axis of ``shape`` (a caller keeps them per patch shape)."""
    return tuple(legendre(degree, int(n), device) for n in shape)


def bias_fields(matrices: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, X, Y, Z)`` multiplicative fields ``exp(sum c_ijk P_i(x) P_j(y) P_k(z))`` (MONAI ``RandBiasField``).

    Args:
        matrices: ``(B, d+1, d+1, d+1)`` from :func:`bias_field_matrices`, on the target device.
        bases: :func:`legendre_bases` of the patch shape, on the same device.
    """
    px, py, pz = bases
    field = torch.einsum("bijk,kz->bijz", matrices, pz)
    field = torch.einsum("bijz,jy->biyz", field, py)
    field = torch.einsum("biyz,ix->bxyz", field, px)
    return torch.exp(field)


def in_plane_theta(angle: float, scales: Sequence[float], plane_axis: int, size: Sequence[int]) -> torch.Tensor:
    """``(3, 4)`` ``affine_grid`` matrix (``align_corners=True``) of a rotation by ``angle`` in the
    plane normal to ``plane_axis`` and per-axis ``scales``, about the patch centre, in voxel units
    (MONAI ``RandAffine``'s grid: output voxel ``v`` samples input ``R S v``, centred coordinates).

    ``scales`` has one factor per array axis (1 along ``plane_axis``).
    """
    in_plane = [a for a in range(3) if a != plane_axis]
    rotation = torch.eye(3, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    a, b = in_plane
    rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = c, -s, s, c
    matrix = rotation @ torch.diag(torch.tensor([float(v) for v in scales], dtype=torch.float64))
    half = torch.tensor([max(int(n) - 1, 1) / 2.0 for n in size], dtype=torch.float64)
    normalised = torch.diag(1.0 / half) @ matrix @ torch.diag(half)  # voxel units -> [-1, 1]
    reverse = list(reversed(range(3)))  # affine_grid orders coordinates (W, H, D) = (Z, Y, X)
    theta = torch.zeros((3, 4), dtype=torch.float64)
    theta[:, :3] = normalised[reverse][:, reverse]
    return theta.float()


def affine_resample(image: torch.Tensor, label: torch.Tensor, theta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Resample ``(B, C, X, Y, Z)`` image (trilinear) and label (nearest) with ``(B, 3, 4)`` ``theta``;
    border padding (MONAI ``RandAffined(mode=("bilinear", "nearest"), padding_mode="border")``)."""
    grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=True)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    label = F.grid_sample(label, grid.to(label.dtype), mode="nearest", padding_mode="border", align_corners=True)
    return image, label


def adjust_gamma(image: torch.Tensor, gamma: float) -> torch.Tensor:
    """MONAI ``AdjustContrast(gamma, retain_stats=True)`` on one sample: gamma on the min-max range,
    then the original mean and standard deviation restored (all on the device, no host sync)."""
    mean, std = image.mean(), image.std()
    low = image.amin()
    spread = image.amax() - low
    out = ((image - low) / (spread + 1e-7)) ** gamma * spread + low
    out = out - out.mean()
    return out / (out.std() + 1e-8) * std + mean


def gaussian_blur(image: torch.Tensor, kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """MONAI ``GaussianSmooth`` on one ``(C, X, Y, Z)`` sample with per-axis 1D ``kernels``
    (:func:`gaussian_kernels`, already on the image's device): separable, zero padding."""
    from monai.networks.layers.simplelayers import separable_filtering

    return separable_filtering(image[None].float(), list(kernels))[0]


def gaussian_kernels(sigmas: Sequence[float], truncated: float = 4.0) -> Tuple[torch.Tensor, ...]:
    """MONAI's ``GaussianFilter`` kernels (``approx="erf"``, ``truncated`` sigmas) for each axis,
    built on the host (their lengths depend on the sigmas)."""
    from monai.networks.layers.convutils import gaussian_1d

    return tuple(gaussian_1d(float(s), truncated=truncated, approx="erf") for s in sigmas)


def histogram_control_points(count: int, uniforms: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(reference, floating)`` control points of MONAI ``RandHistogramShift`` for ``count`` points:
    reference ``linspace(0, 1, count)``; floating point ``i`` (``0 < i < count - 1``) drawn
    uniformly between floating point ``i - 1`` and reference point ``i + 1``, from ``uniforms[i - 1]``
    (so the map is monotone and keeps both ends). float64, on the host."""
    reference = torch.from_numpy(np.linspace(0.0, 1.0, int(count)))  # numpy's rounding, as MONAI
    floating = reference.clone()
    for i in range(1, int(count) - 1):
        low, high = float(floating[i - 1]), float(floating[i + 1])
        floating[i] = low + (high - low) * float(uniforms[i - 1])
    return reference, floating


def histogram_shift(image: torch.Tensor, reference: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """MONAI ``RandHistogramShift`` on one sample: the piecewise-linear map taking ``reference``
    to ``floating`` control points, both scaled to the sample's ``[min, max]``.

    Where the result is not finite anywhere (a constant or nearly constant sample: the control
    points' spacings round to 0), the input comes back unchanged, as
    :class:`planar3d.augment.FiniteRandHistogramShiftd` does; decided on the device (no host sync).
    """
    low, high = image.amin(), image.amax()
    xp = reference.to(image) * (high - low) + low
    fp = floating.to(image) * (high - low) + low
    slopes = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    offsets = fp[:-1] - slopes * xp[:-1]
    flat = image.reshape(-1)
    index = (torch.searchsorted(xp.contiguous(), flat) - 1).clamp(0, len(slopes) - 1)
    out = (slopes[index] * flat + offsets[index]).reshape(image.shape)
    out = torch.where(image < xp[0], fp[0], out)
    out = torch.where(image > xp[-1], fp[-1], out)
    return torch.where(torch.isfinite(out).all(), out, image)
