"""The planar 3D res-u-net of Kolařík et al. (ICPR 2020).

Encoder: VGG-16 blocks 1-4 with planar kernels (:class:`PlanarVGGEncoder`). Bottleneck: two
planar convs, output concatenated with their input ("residual concatenation"). Decoder, four
levels: transposed conv (kernel = stride = that level's pool), concatenation with the encoder
skip, a conv dilated 2 in the plane, a plain conv, then concatenation of the level's input with
its output. Head: 1x1x1 conv giving logits (apply a sigmoid for probabilities).

Any input size works: the input is zero-padded at the far end of each axis up to a multiple of
the total pooling factor along that axis and the output is cropped back, so the output always
has the input's spatial shape.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from planar3d.errors import ConfigError
from planar3d.networks.encoder import PlanarVGGEncoder, scaled
from planar3d.networks.layers import (
    BlockMaxPool3d, Triple, activation, along_plane, conv3d, conv_of_concatenation, fused_conv_relu, fuses_conv_relu,
    normalization,
)

DECODER_WIDTHS = (256, 128, 64, 32)
BOTTLENECK_WIDTH = 512


@dataclass
class PlanarResUNetConfig:
    """Everything that defines the network's shape; stored in every checkpoint.

    Attributes:
        in_channels: 1 (RGB stem kernels summed) or 3 (grayscale repeated, as published).
        out_channels: output logit channels (1 for lesion vs background).
        plane_axis: spatial axis (0, 1, 2) normal to the planar kernels.
        pool_across_planes: per encoder level, pool 2x2x2 (True, as published) or in-plane only
            (False: 2x2 in the plane, 1 along ``plane_axis``, for thick-slice scans).
        width: channel multiplier (1.0 = published widths, ~25 M parameters).
        norm: ``None`` (published), ``"batch"`` or ``"instance"`` after each decoder/bottleneck conv.
        dropout: dropout probability after each decoder/bottleneck conv (0.15 in some variants).
        act: decoder/bottleneck activation, ``"relu"`` or ``"elu"``.
        deepest_kernel_depth: decoder kernel size along ``plane_axis`` at the deepest level
            (3, or 2 as in the authors' first variant).
        encoder_mode: ``"planar"`` (exact transfer) or ``"i3d"``.
        i3d_depth: encoder kernel depth along ``plane_axis`` in ``"i3d"`` mode.
    """

    in_channels: int = 1
    out_channels: int = 1
    plane_axis: int = 2
    pool_across_planes: Tuple[bool, bool, bool, bool] = (True, True, True, True)
    width: float = 1.0
    norm: Optional[str] = None
    dropout: float = 0.0
    act: str = "relu"
    deepest_kernel_depth: int = 3
    encoder_mode: str = "planar"
    i3d_depth: int = 3

    def __post_init__(self):
        problems = check_network_values(self)
        if problems:
            raise ConfigError("network: " + "; ".join(problems))

    def to_dict(self) -> Dict[str, object]:
        values = asdict(self)
        values["pool_across_planes"] = list(self.pool_across_planes)
        return values

    @classmethod
    def from_dict(cls, values: Dict[str, object]) -> "PlanarResUNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown network config keys: {', '.join(unknown)}")
        values = dict(values)
        if "pool_across_planes" in values:
            values["pool_across_planes"] = tuple(bool(v) for v in values["pool_across_planes"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]

    def pool_kernels(self) -> List[Triple]:
        return [along_plane(2 if across else 1, 2, self.plane_axis) for across in self.pool_across_planes]

    def size_multiple(self) -> Triple:
        """Each axis's input size is padded up to a multiple of this."""
        multiple = [1, 1, 1]
        for kernel in self.pool_kernels():
            multiple = [m * k for m, k in zip(multiple, kernel)]
        return tuple(multiple)  # type: ignore[return-value]


def check_network_values(config) -> List[str]:
    """Problems with the values of a network config (the MONAI-style arguments may still
    change ``in_channels``/``out_channels``, so only their sign is checked)."""
    problems = []
    if config.plane_axis not in (0, 1, 2):
        problems.append(f"plane_axis must be 0, 1 or 2, got {config.plane_axis!r}")
    if len(tuple(config.pool_across_planes)) != 4:
        problems.append(f"pool_across_planes needs 4 values (one per encoder level), got {config.pool_across_planes!r}")
    if not config.width > 0:
        problems.append(f"width must be positive, got {config.width}")
    if not 0 <= config.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {config.dropout}")
    if config.norm not in (None, "batch", "instance"):
        problems.append(f"norm must be null, 'batch' or 'instance', got {config.norm!r}")
    if config.act not in ("relu", "elu"):
        problems.append(f"act must be 'relu' or 'elu', got {config.act!r}")
    if config.encoder_mode not in ("planar", "i3d"):
        problems.append(f"encoder_mode must be 'planar' or 'i3d', got {config.encoder_mode!r}")
    for name in ("in_channels", "out_channels", "deepest_kernel_depth", "i3d_depth"):
        if int(getattr(config, name)) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(config, name)}")
    return problems


class _ConvUnit(nn.Sequential):
    """conv -> norm -> activation -> dropout."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Triple, dilation: Triple, norm, act: str, dropout: float):
        super().__init__(
            conv3d(in_ch, out_ch, kernel, dilation),
            normalization(norm, out_ch),
            activation(act),
            nn.Dropout3d(dropout) if dropout > 0 else nn.Identity(),
        )
        # Without a norm, a ReLU unit is conv + ReLU (+ dropout, a no-op in eval): fusable.
        self.conv_relu_only = norm in (None, "none") and act == "relu"
        # With instance norm, the norm and the ReLU can overwrite the conv's output in inference.
        self.norm_relu = norm == "instance" and act == "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.conv_relu_only and not self.training and fuses_conv_relu(x):
                return fused_conv_relu(self[0], x)
            return self.after_conv(self[0](x))
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def after_conv(self, y: torch.Tensor) -> torch.Tensor:
        """Norm, activation and dropout applied to ``y``, an output of this unit's conv that
        nothing else holds (in inference it may be overwritten: :data:`NORM_RELU_IN_PLACE_DEVICES`)."""
        if self.norm_relu and not self.training and y.device.type in NORM_RELU_IN_PLACE_DEVICES:
            return self[1].relu_in_place(y)  # dropout is the identity in inference
        for module in list(self)[1:]:
            y = module(y)
        return y


class _DecoderLevel(nn.Module):
    """Upsample, concatenate the skip, dilated conv, conv, residual concatenation."""

    def __init__(self, in_ch: int, skip_ch: int, width: int, up_kernel: Triple, kernel: Triple, dilation: Triple, config):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, width, up_kernel, stride=up_kernel)
        merged = width + skip_ch
        self.conv1 = _ConvUnit(merged, width, kernel, dilation, config.norm, config.act, config.dropout)
        self.conv2 = _ConvUnit(width, width, kernel, (1, 1, 1), config.norm, config.act, config.dropout)
        self.out_channels = merged + width

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # nested, not "and": TorchScript would compile the second operand, which reads a global tuple
            if _splits_concatenations(x):
                # Inference: one concatenation instead of two (the same values to rounding).
                return torch.cat(self.parts(x, skip), dim=1)
        merged = torch.cat([self.up(x), skip], dim=1)
        return torch.cat([merged, self.conv2(self.conv1(merged))], dim=1)

    @torch.jit.unused
    def parts(self, x: torch.Tensor, skip: torch.Tensor) -> List[torch.Tensor]:
        """The level's output as parts whose concatenation is :meth:`forward`'s result.

        In inference on a device of :data:`SPLIT_CONCATENATION_DEVICES` three parts, upsampled
        input, skip and the convs' output: the first two are never concatenated
        (:func:`conv_of_concatenation`), which at the last level saves writing the largest tensor
        but one of the pass. Elsewhere two: their concatenation (``merged``) and the convs' output.
        """
        upsampled = self.up(x)
        if not _splits_concatenations(x):
            merged = torch.cat([upsampled, skip], dim=1)
            return [merged, self.conv2(self.conv1(merged))]
        hidden = self.conv1.after_conv(conv_of_concatenation(self.conv1[0], [upsampled, skip]))
        return [upsampled, skip, self.conv2(hidden)]


#: Devices where an inference conv unit with instance norm and ReLU normalises the conv's
#: output in place and applies the ReLU to it block by block
#: (:meth:`planar3d.networks.layers.InstanceNorm3d.relu_in_place`), instead of writing the norm's
#: result to a new tensor and a ReLU pass over it. CPU (docs/prediction.md, "The default config's
#: network"): the 1 mm head's model step 18.7-20.7 -> 14.1-14.5 s with the blocked norm. CUDA keeps
#: the path timed there.
NORM_RELU_IN_PLACE_DEVICES: Tuple[str, ...] = ("cpu",)

#: Devices where inference computes a decoder level's first conv from the parts of its
#: concatenation: the CPU (docs/prediction.md: a concatenation is a full write and read of the
#: largest tensors through 2 cores' memory bandwidth) and CUDA (H200, whole head 176x256x256,
#: bf16: 33.4 -> 32.7 ms for the published network, 111.0 -> 107.5 ms for the default config's;
#: ``benchmarks/gpu_diagnostics.py`` times both).
SPLIT_CONCATENATION_DEVICES = ("cpu", "cuda")


def _splits_concatenations(x: torch.Tensor) -> bool:
    """Whether a decoder level computes its first conv from the parts of its concatenation
    (inference on a device of :data:`SPLIT_CONCATENATION_DEVICES`)."""
    return x.device.type in SPLIT_CONCATENATION_DEVICES and not torch.is_grad_enabled()


class PlanarResUNet(nn.Module):
    """Planar 3D res-u-net: ImageNet VGG-16 encoder with planar kernels, 3D decoder.

    Args:
        config: a :class:`PlanarResUNetConfig` (``None`` = published defaults).
        freeze_encoder: keep the transferred encoder's weights fixed (the paper's setting).
        spatial_dims, in_channels, out_channels: MONAI-style explicit arguments; when given
            they override the config (``spatial_dims`` must be 3).

    Example:
        >>> net = PlanarResUNet(PlanarResUNetConfig(width=0.125))
        >>> net(torch.zeros(1, 1, 17, 20, 9)).shape
        torch.Size([1, 1, 17, 20, 9])
    """

    def __init__(
        self,
        config: Optional[PlanarResUNetConfig] = None,
        freeze_encoder: bool = False,
        spatial_dims: int = 3,
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
    ):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"PlanarResUNet is a 3D network: spatial_dims must be 3, got {spatial_dims}")
        config = PlanarResUNetConfig(**(config.to_dict() if config else {}))
        if in_channels is not None:
            config.in_channels = in_channels
        if out_channels is not None:
            config.out_channels = out_channels
        if config.plane_axis not in (0, 1, 2):
            raise ValueError(f"plane_axis must be 0, 1 or 2, got {config.plane_axis}")
        self.config = config
        pools = config.pool_kernels()
        self.encoder = PlanarVGGEncoder(
            config.in_channels, config.plane_axis, pools, config.width, config.encoder_mode, config.i3d_depth
        )
        bottleneck_width = scaled(BOTTLENECK_WIDTH, config.width)
        planar = along_plane(1, 3, config.plane_axis)
        encoder_out = self.encoder.out_channels[-1]
        self.bottleneck = nn.Sequential(
            _ConvUnit(encoder_out, bottleneck_width, planar, (1, 1, 1), config.norm, config.act, config.dropout),
            _ConvUnit(bottleneck_width, bottleneck_width, planar, (1, 1, 1), config.norm, config.act, config.dropout),
        )
        channels = encoder_out + bottleneck_width
        dilation = along_plane(1, 2, config.plane_axis)
        self.decoder = nn.ModuleList()
        for level, width in enumerate(DECODER_WIDTHS):
            encoder_level = len(pools) - 1 - level
            depth = config.deepest_kernel_depth if level == 0 else 3
            kernel = along_plane(depth, 3, config.plane_axis)
            decoder_level = _DecoderLevel(
                channels, self.encoder.out_channels[encoder_level], scaled(width, config.width),
                pools[encoder_level], kernel, dilation, config,
            )
            self.decoder.append(decoder_level)
            channels = decoder_level.out_channels
        self.head = nn.Conv3d(channels, config.out_channels, kernel_size=1)
        self._multiple = config.size_multiple()
        if freeze_encoder:
            self.freeze_encoder()

    def set_initial_probability(self, probability: float) -> None:
        """Set the head's bias to ``logit(probability)``, so that an untrained network outputs
        about that probability everywhere (the prior initialisation of RetinaNet, Lin et al. 2017).

        Why: with the bias at its default (near 0) a new network calls half of every patch lesion;
        a loss with a cross-entropy term then drives all outputs to background within a few
        epochs, and the cpu config's runs of issue 9 predicted nothing for 8-22 epochs before they learnt
        (docs/training.md, "Issue 9, fourteenth session"). Only the bias changes: no random
        number is drawn, so the other weights are those of the same seed without it.
        """
        if not 0 < probability < 1:
            raise ValueError(f"probability must be in (0, 1), got {probability}")
        with torch.no_grad():
            self.head.bias.fill_(math.log(probability / (1 - probability)))

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) training the transferred VGG-16 weights."""
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(not frozen)

    def use_deterministic_pooling(self, enabled: bool = True) -> None:
        """Pool with a deterministic backward on CUDA (for ``--deterministic`` training)."""
        for module in self.modules():
            if isinstance(module, BlockMaxPool3d):
                module.deterministic = enabled

    @property
    @torch.jit.unused
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def load_encoder_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a state dict from :func:`planar3d.inflate.vgg16_to_planar_encoder` (strict)."""
        self.encoder.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad: List[int] = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            # Sizes stay symbolic (no int()) so torch.export keeps them dynamic; zero padding
            # is one copy of the 1-channel input, negligible next to the first conv.
            pad += [0, (-size[axis]) % self._multiple[axis]]
        skips, x = self.encoder(F.pad(x, pad))
        x = torch.cat([x, self.bottleneck(x)], dim=1)
        last = len(self.decoder) - 1
        for level, decoder_level in enumerate(self.decoder):
            if level == last and not torch.is_grad_enabled() and not torch.jit.is_scripting():
                # Inference: the head is linear, so it applies to the parts of the last level's
                # concatenation separately and their sum is the same logits (to rounding); the
                # full-resolution concatenation (128 channels at width 1.0, the largest tensor
                # of the pass) is never written, on the CPU not even its 96-channel first part.
                logits = conv_of_concatenation(self.head, decoder_level.parts(x, skips[0]))
                return logits[:, :, : size[0], : size[1], : size[2]]
            x = decoder_level(x, skips[len(skips) - 1 - level])
        logits = self.head(x)
        return logits[:, :, : size[0], : size[1], : size[2]]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
