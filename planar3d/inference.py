"""Sliding-window inference of a network over one preprocessed volume.

Shared by validation during training and by ``planar3d predict`` so both compute the same
thing. Windows are blended with a Gaussian (MONAI ``sliding_window_inference``); a window size of
``-1`` (or ``None`` for all axes) takes the whole extent of that axis, so the default on the CPU,
slabs of whole planes, runs few large windows, the cheapest way to cover a scan there
(docs/prediction.md: overlap multiplies the work).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing on the CPU (bf16 conv3d is slower than fp32 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CUDA use the channels_last_3d layout (about 2x faster convs)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _window(roi_size: Optional[Sequence[int]], shape: Sequence[int]) -> list:
    if roi_size is None:
        return list(shape)
    return [int(s) if int(r) <= 0 else min(int(r), int(s)) for r, s in zip(roi_size, shape)]


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    volume: np.ndarray,
    roi_size: Optional[Sequence[int]] = None,
    overlap: float | Sequence[float] = 0.25,
    sw_batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: bool = True,
    flip_axes: Sequence[int] = (),
    in_channels: int = 1,
) -> np.ndarray:
    """Lesion probability (sigmoid of the logits) for every voxel of ``volume``.

    Args:
        model: network returning logits of shape (N, 1, *spatial).
        volume: preprocessed 3D array (already reoriented and normalised).
        roi_size: window size per axis; ``-1`` or ``None`` = whole axis.
        overlap: window overlap fraction (one value or one per axis).
        sw_batch_size: windows run together in one batch.
        device: where the model runs.
        amp: bf16 autocast on CUDA.
        flip_axes: spatial axes to flip for test-time augmentation; the prediction is the
            mean of the plain pass and one pass per flipped axis (each flipped back).
        in_channels: 3 repeats the grey volume into 3 channels (the published setting).

    Returns:
        float32 array of ``volume``'s shape.
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
    if in_channels > 1:
        image = image.expand(-1, in_channels, -1, -1, -1)
    window = _window(roi_size, volume.shape)
    memory_format = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format

    def run(batch: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, amp):
            return model(batch.contiguous(memory_format=memory_format)).float()

    def one_pass(x: torch.Tensor) -> torch.Tensor:
        if list(window) == list(volume.shape):  # one window: no blending needed
            return torch.sigmoid(run(x))
        logits = sliding_window_inference(
            x, window, sw_batch_size, run, overlap=overlap, mode="gaussian", padding_mode="constant"
        )
        return torch.sigmoid(logits)

    probability = one_pass(image)
    for axis in flip_axes:
        dims = [2 + int(axis)]
        probability += torch.flip(one_pass(torch.flip(image, dims)), dims)
    probability /= 1 + len(flip_axes)
    return probability[0, 0].cpu().numpy()
