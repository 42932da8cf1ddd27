"""Axis-aware layers: the even-kernel 'same' conv computes what ``padding="same"`` computes."""

import warnings

import pytest
import torch
from torch import nn

from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from planar3d.networks.layers import EvenSameConv3d, conv3d


@pytest.mark.parametrize("kernel,dilation", [((3, 3, 2), (2, 2, 1)), ((3, 3, 2), (1, 1, 1)), ((2, 3, 3), (1, 2, 2)),
                                             ((2, 4, 3), (1, 1, 1)), ((3, 2, 3), (1, 3, 1))])
def test_even_kernel_conv_equals_padding_same_without_warning(kernel, dilation):
    torch.manual_seed(0)
    reference = nn.Conv3d(5, 4, kernel, padding="same", dilation=dilation)
    conv = conv3d(5, 4, kernel, dilation)
    assert isinstance(conv, EvenSameConv3d)
    conv.load_state_dict(reference.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 5, 9, 8, 7, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # padding="same"'s copy warning would fail here
        out = conv(x)
        with torch.no_grad():
            assert torch.allclose(conv(x), out, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(x)
    assert out.shape == expected.shape == (2, 4, 9, 8, 7)
    assert (out - expected).abs().max().item() <= 1e-6
    # gradients too (training uses the same layer)
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_grad = torch.autograd.grad(reference(x).square().sum(), x)[0]
    assert (grad - expected_grad).abs().max().item() <= 1e-5


def test_network_with_deepest_depth_2_runs_without_warning_and_scripts():
    net = PlanarResUNet(PlanarResUNetConfig(width=0.0625, deepest_kernel_depth=2)).eval()
    x = torch.randn(1, 1, 16, 20, 18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            out = net(x)
    scripted = torch.jit.script(net)
    with torch.inference_mode():
        assert torch.equal(scripted(x), out)


def test_inference_head_on_split_halves_equals_the_training_forward():
    # without autograd the head runs on the two halves of the last concatenation (no full-size cat)
    torch.manual_seed(0)
    for config in (PlanarResUNetConfig(width=0.125, deepest_kernel_depth=2),
                   PlanarResUNetConfig(width=0.0625, plane_axis=0, in_channels=3, out_channels=2, norm="batch")):
        net = PlanarResUNet(config).eval()
        x = torch.randn(1, config.in_channels, 20, 17, 19)
        expected = net(x)  # grad enabled: the plain concatenation path
        with torch.inference_mode():
            fast = net(x)
        assert fast.shape == expected.shape
        assert (fast - expected.detach()).abs().max().item() <= 1e-6
