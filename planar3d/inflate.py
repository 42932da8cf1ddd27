"""2D-to-3D weight mapping as pure state-dict transforms.

Kernels are PyTorch-layout tensors: 2D ``(out, in, kH, kW)``, 3D ``(out, in, kD, kH, kW)``
where the three spatial dims are the array's axes 0, 1, 2 (NIfTI i, j, k). ``plane_axis`` is the
spatial axis *normal* to the kernel plane, i.e. the one the planar kernel has size 1 along.

- :func:`planar_kernel` inserts a singleton axis: a conv3d with it equals the 2D conv applied to
  every slice along ``plane_axis`` (exactly, up to float summation order).
- :func:`i3d_kernel` repeats the 2D kernel ``depth`` times along the new axis and divides by
  ``depth`` (Carreira & Zisserman's I3D): on a volume constant along that axis it equals the
  2D output, elsewhere it mixes neighbouring slices.
- :func:`sum_input_channels` adapts an RGB stem to one channel by summing its kernels over the
  input channels (as timm's ``adapt_input_conv``): equal to the RGB layer fed the grayscale
  image repeated three times, at a third of the cost.
- :func:`fold_input_affine` folds the per-channel affine map from the product's normalised
  intensity to a source's training input (its :class:`planar3d.vgg_sources.InputConvention`)
  into the stem: scaled kernels, shifted bias.
- :func:`vgg16_to_planar_encoder` applies these to VGG-16 blocks 1-4 and renames the keys to
  those of :class:`planar3d.networks.encoder.PlanarVGGEncoder`.

Example:
    >>> import torch
    >>> planar_kernel(torch.zeros(64, 3, 3, 3), plane_axis=2).shape
    torch.Size([64, 3, 3, 3, 1])
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from planar3d.errors import ConfigError
from planar3d.vgg import VGG16_CONV_INDICES

ENCODER_CHECKPOINT_FORMAT = "planar3d-encoder/1"
NUM_ENCODER_BLOCKS = 4  # VGG-16 blocks 1-4; block 5 is not used (as in the paper)
MAPPING_MODES = ("planar", "i3d")


def _check_plane_axis(plane_axis: int) -> None:
    if plane_axis not in (0, 1, 2):
        raise ConfigError(f"plane_axis must be 0, 1 or 2 (a spatial axis), got {plane_axis}")


def check_mapping(plane_axis: int, in_channels: int, mode: str, i3d_depth: int) -> None:
    """Raise :class:`ConfigError` for mapping settings that cannot be used."""
    _check_plane_axis(plane_axis)
    if mode not in MAPPING_MODES:
        raise ConfigError(f"mode must be one of {', '.join(MAPPING_MODES)}, got {mode!r}")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
    if i3d_depth < 1:
        raise ConfigError(f"i3d depth must be >= 1, got {i3d_depth}")


def planar_kernel(weight: torch.Tensor, plane_axis: int) -> torch.Tensor:
    """``(out, in, kH, kW)`` -> 3D kernel with a singleton along ``plane_axis``.

    The 2D kernel's two axes keep their order over the two remaining spatial axes.
    """
    _check_plane_axis(plane_axis)
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D conv kernel (out, in, kH, kW), got shape {tuple(weight.shape)}")
    return weight.unsqueeze(2 + plane_axis).contiguous()


def i3d_kernel(weight: torch.Tensor, plane_axis: int, depth: int) -> torch.Tensor:
    """``(out, in, kH, kW)`` -> kernel repeated ``depth`` times along ``plane_axis``, divided by ``depth``."""
    if depth < 1:
        raise ConfigError(f"i3d depth must be >= 1, got {depth}")
    planar = planar_kernel(weight, plane_axis)
    repeats = [1, 1, 1, 1, 1]
    repeats[2 + plane_axis] = depth
    return (planar.repeat(*repeats) / depth).contiguous()


def sum_input_channels(weight: torch.Tensor) -> torch.Tensor:
    """Sum a stem kernel over its input channels: ``(out, 3, ...)`` -> ``(out, 1, ...)``."""
    return weight.sum(dim=1, keepdim=True)


def fold_input_affine(state: Dict[str, torch.Tensor], scale: torch.Tensor, shift: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fold ``v_c = scale[c] * x + shift[c]`` (x replicated to every input channel) into the stem.

    For the stem ``W, b`` (``features.0``, ``(out, C, kH, kW)``), returns a new state dict with
    ``W'[o, c] = W[o, c] * scale[c]`` and ``b'[o] = b[o] + sum_c shift[c] * sum_kh,kw W[o, c]``,
    so ``conv(x, W', b') == conv(v, W, b)`` wherever the kernel window lies inside the image.
    On the one-pixel border the zero padding differs: ``x = 0`` pads with ``v = shift``, not
    ``v = 0`` (see ``docs/weights.md``). Computed in float64, returned in the stem's dtype.

    Example:
        >>> state = {"features.0.weight": torch.ones(1, 3, 3, 3), "features.0.bias": torch.zeros(1)}
        >>> folded = fold_input_affine(state, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, -1.0]))
        >>> folded["features.0.weight"][0, :, 0, 0].tolist(), folded["features.0.bias"].tolist()
        ([1.0, 2.0, 3.0], [0.0])
    """
    weight = state["features.0.weight"]
    bias = state["features.0.bias"]
    scale = torch.as_tensor(scale, dtype=torch.float64)
    shift = torch.as_tensor(shift, dtype=torch.float64)
    if scale.shape != (weight.shape[1],) or shift.shape != (weight.shape[1],):
        raise ValueError(f"need one scale and shift per stem input channel ({weight.shape[1]}), "
                         f"got {tuple(scale.shape)} and {tuple(shift.shape)}")
    w64 = weight.detach().double()
    folded = dict(state)
    folded["features.0.weight"] = (w64 * scale[None, :, None, None]).to(weight.dtype)
    folded["features.0.bias"] = (bias.detach().double() + (w64.sum(dim=(2, 3)) * shift[None, :]).sum(dim=1)).to(bias.dtype)
    return folded


def encoder_key_map(num_blocks: int = NUM_ENCODER_BLOCKS) -> Dict[str, str]:
    """torchvision ``features.N`` prefix -> encoder prefix ``blocks.B.S`` for each conv.

    In the encoder, block ``B`` is a Sequential of (conv, activation) pairs, so its ``j``-th conv
    sits at index ``2 j``.
    """
    mapping = {}
    for block, indices in enumerate(VGG16_CONV_INDICES[:num_blocks]):
        for position, index in enumerate(indices):
            mapping[f"features.{index}"] = f"blocks.{block}.{2 * position}"
    return mapping


def vgg16_to_planar_encoder(
    state: Dict[str, torch.Tensor],
    plane_axis: int = 2,
    in_channels: int = 1,
    mode: str = "planar",
    i3d_depth: int = 3,
    num_blocks: int = NUM_ENCODER_BLOCKS,
) -> Dict[str, torch.Tensor]:
    """Map a torchvision VGG-16 state dict to a planar 3D encoder state dict.

    Args:
        state: torchvision-layout VGG-16 state dict (classifier keys are ignored).
        plane_axis: spatial axis normal to the kernel plane (0, 1 or 2).
        in_channels: 1 sums the first layer's RGB kernels; 3 keeps them (the paper's setting).
        mode: ``"planar"`` (exact) or ``"i3d"`` (inflate to depth ``i3d_depth``).
        i3d_depth: kernel size along ``plane_axis`` in ``"i3d"`` mode.
        num_blocks: VGG blocks to take (4 in the paper).

    Returns:
        A new state dict (inputs are not modified) with keys ``blocks.B.S.weight|bias``.
    """
    check_mapping(plane_axis, in_channels, mode, i3d_depth)
    mapped: Dict[str, torch.Tensor] = {}
    for old_prefix, new_prefix in encoder_key_map(num_blocks).items():
        weight = state[f"{old_prefix}.weight"].detach().clone().float()
        if old_prefix == "features.0" and in_channels == 1:
            weight = sum_input_channels(weight)
        if mode == "planar":
            weight = planar_kernel(weight, plane_axis)
        else:
            weight = i3d_kernel(weight, plane_axis, i3d_depth)
        mapped[f"{new_prefix}.weight"] = weight
        mapped[f"{new_prefix}.bias"] = state[f"{old_prefix}.bias"].detach().clone().float()
    return mapped


def encoder_state_from_source(
    source: str | Path,
    plane_axis: int = 2,
    in_channels: int = 1,
    mode: str = "planar",
    i3d_depth: int = 3,
    product_mean: float = 0.449,
    product_std: float = 0.226,
):
    """Read a VGG-16 source, fold its input convention into the stem and map it to the encoder.

    ``product_mean`` / ``product_std`` are those of the product's intensity normalisation
    (:class:`planar3d.preprocess.NormalizationConfig`), so the encoder takes normalised
    intensities while the transferred kernels see the range they were trained on.

    Returns:
        ``(encoder_state, weights)``: the encoder state dict and the
        :class:`planar3d.vgg_sources.VGG16Weights` read (source, convention, ignored tensors).
    """
    from planar3d.vgg_sources import load_vgg16_weights

    weights = load_vgg16_weights(source)
    state = weights.state
    if weights.convention is not None:
        state = fold_input_affine(state, *weights.convention.affine(product_mean, product_std))
    return vgg16_to_planar_encoder(state, plane_axis, in_channels, mode, i3d_depth), weights


def write_encoder_checkpoint(
    vgg16_source: str | Path,
    out: str | Path,
    plane_axis: int = 2,
    in_channels: int = 1,
    mode: str = "planar",
    i3d_depth: int = 3,
) -> str:
    """Map VGG-16 weights from ``vgg16_source`` and save a planar 3D encoder checkpoint.

    The checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``) holding the
    encoder state dict and everything needed to use it: plane axis, input channels, mapping mode
    and where the 2D weights came from. Returns a one-line summary.
    """
    from planar3d.checkpoint import save_checkpoint
    from planar3d.preprocess import NormalizationConfig
    from planar3d.provenance import package_versions

    check_mapping(plane_axis, in_channels, mode, i3d_depth)  # before any download
    normalization = NormalizationConfig()
    encoder_state, weights = encoder_state_from_source(
        vgg16_source, plane_axis, in_channels, mode, i3d_depth, normalization.mean, normalization.std
    )
    source = weights.summary
    checkpoint = {
        "format": ENCODER_CHECKPOINT_FORMAT,
        "state_dict": encoder_state,
        "plane_axis": plane_axis,
        "in_channels": in_channels,
        "mode": mode,
        "i3d_depth": i3d_depth if mode == "i3d" else 1,
        "num_blocks": NUM_ENCODER_BLOCKS,
        "source": source,
        "input_convention": weights.convention.name if weights.convention else "none",
        # The stem takes (g - mean) / std of this normalisation (folded in), not the source's pixels.
        "folded_for_normalization": {"mean": normalization.mean, "std": normalization.std},
        "ignored_source_tensors": list(weights.ignored),
        "versions": package_versions(),
    }
    save_checkpoint(checkpoint, out)
    parameters = sum(value.numel() for value in encoder_state.values())
    return f"wrote {out}: planar 3D VGG-16 encoder (blocks 1-{NUM_ENCODER_BLOCKS}, {parameters:,} parameters, mode {mode}, plane axis {plane_axis}, {in_channels} input channel(s)) from {source}"


def load_encoder_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`write_encoder_checkpoint` (``weights_only=True``)."""
    from planar3d.checkpoint import load_checkpoint

    return load_checkpoint(path, expected_format=ENCODER_CHECKPOINT_FORMAT)
