"""The planar VGG-16 encoder (blocks 1-4), the transferred half of the res-u-net."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from planar3d.networks.layers import BlockMaxPool3d, Triple, along_plane, conv3d, fuses_conv_relu, run_conv_relu_pairs

VGG16_BLOCK_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512))


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


class PlanarVGGEncoder(nn.Module):
    """VGG-16 blocks 1-4 with planar 3D kernels, each block followed by a max-pool.

    With ``mode="planar"`` every conv has kernel 3x3 in the plane and 1 along ``plane_axis``
    (see :func:`planar3d.inflate.planar_kernel`); with ``mode="i3d"`` it has ``i3d_depth`` along
    ``plane_axis``. State-dict keys (``blocks.B.S.weight``) are those produced by
    :func:`planar3d.inflate.vgg16_to_planar_encoder`.

    Args:
        in_channels: 1 (summed stem) or 3 (grayscale repeated, as published).
        plane_axis: spatial axis normal to the kernel plane.
        pool_kernels: one max-pool kernel (= stride) per block, e.g. ``(2, 2, 2)`` or ``(2, 2, 1)``.
        width: channel multiplier; pretrained weights need 1.0.
        mode: ``"planar"`` or ``"i3d"``.
        i3d_depth: kernel size along ``plane_axis`` for ``"i3d"`` (odd).

    Returns from ``forward``: the output of every block before pooling (U-Net skips) and the
    pooled output of the last block.
    """

    def __init__(
        self,
        in_channels: int = 1,
        plane_axis: int = 2,
        pool_kernels: Sequence[Triple] = ((2, 2, 2),) * 4,
        width: float = 1.0,
        mode: str = "planar",
        i3d_depth: int = 3,
    ):
        super().__init__()
        if len(pool_kernels) != len(VGG16_BLOCK_WIDTHS):
            raise ValueError(f"need {len(VGG16_BLOCK_WIDTHS)} pool kernels, got {len(pool_kernels)}")
        depth = 1 if mode == "planar" else i3d_depth
        kernel = along_plane(depth, 3, plane_axis)
        self.blocks = nn.ModuleList()
        self.pools = nn.ModuleList()
        channels = in_channels
        self.out_channels: List[int] = []
        for widths, pool in zip(VGG16_BLOCK_WIDTHS, pool_kernels):
            layers: List[nn.Module] = []
            for w in widths:
                layers += [conv3d(channels, scaled(w, width), kernel), nn.ReLU(inplace=True)]
                channels = scaled(w, width)
            self.blocks.append(nn.Sequential(*layers))
            self.pools.append(BlockMaxPool3d(pool))
            self.out_channels.append(channels)

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        skips: List[torch.Tensor] = []
        for block, pool in zip(self.blocks, self.pools):
            if torch.jit.is_scripting():
                x = block(x)
            else:  # inference where fused: each conv + ReLU as one call (layers.fused_conv_relu)
                x = run_conv_relu_pairs(block, x) if fuses_conv_relu(x) else block(x)
            skips.append(x)
            x = pool(x)
        return skips, x
