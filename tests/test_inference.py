"""Sliding-window inference: windows, blending and flip TTA give what the model computes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from planar3d.inference import predict_probabilities


class Pointwise(nn.Module):
    """Logit = first channel minus the mean of the others (a voxel-wise model: windows cannot change it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - (x[:, 1:].mean(1, keepdim=True) if x.shape[1] > 1 else 0) * 0.5


class Flipper(nn.Module):
    """Not flip-equivariant: the logit is the index along axis 0 (so TTA averages it with its mirror)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return ramp.expand(x.shape[0], 1, *x.shape[2:]).clone()


def test_whole_volume_and_windows_equal_the_pointwise_model():
    volume = np.random.default_rng(0).normal(size=(9, 10, 11)).astype(np.float32)
    expected = torch.sigmoid(torch.from_numpy(volume)).numpy()
    whole = predict_probabilities(Pointwise(), volume)
    assert whole.dtype == np.float32 and whole.shape == volume.shape
    np.testing.assert_array_equal(whole, expected)
    windows = predict_probabilities(Pointwise(), volume, roi_size=(-1, -1, 4), overlap=0.5)
    np.testing.assert_allclose(windows, expected, atol=1e-6)
    larger_than_the_volume = predict_probabilities(Pointwise(), volume, roi_size=(100, 4, -1), overlap=0.0)
    np.testing.assert_allclose(larger_than_the_volume, expected, atol=1e-6)


def test_three_channels_repeat_the_grey_volume():
    volume = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    # with 3 identical channels: x - mean(x, x) / 2 = x / 2
    np.testing.assert_allclose(predict_probabilities(Pointwise(), volume, in_channels=3),
                               torch.sigmoid(torch.from_numpy(volume) / 2).numpy(), atol=1e-7)


def test_flip_tta_averages_the_flipped_passes():
    volume = np.zeros((4, 3, 2), np.float32)
    plain = torch.sigmoid(torch.arange(4.0)).numpy()
    expected = (plain + plain[::-1]) / 2  # one plain pass and one flipped along axis 0
    result = predict_probabilities(Flipper(), volume, flip_axes=(0,))
    np.testing.assert_allclose(result[:, 0, 0], expected, atol=1e-7)
    assert np.allclose(predict_probabilities(Flipper(), volume, flip_axes=(1, 2))[:, 1, 1], plain)
