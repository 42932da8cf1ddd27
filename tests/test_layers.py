"""Axis-aware layers: the even-kernel 'same' conv computes what ``padding="same"`` computes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from planar3d.networks.layers import (
    EvenSameConv3d, OneChannelConv3d, _pointwise_as_matmul, conv3d, conv_of_concatenation, pointwise_conv_as_matmul,
)


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
    scripted = torch.jit.script(net)  # scripting compiles the plain concatenation path
    with torch.inference_mode():
        assert (scripted(x) - out).abs().max().item() <= 1e-6


@pytest.mark.parametrize("split_levels", [True, False], ids=["three-parts", "two-parts"])
def test_inference_head_on_split_halves_equals_the_training_forward(split_levels, monkeypatch):
    # without autograd the head runs on the parts of the last level's concatenation (no
    # full-size cat); on the CPU and CUDA the levels' first convs also run on their parts. A
    # device without that rule (two parts) is forced here onto the CPU.
    from planar3d.networks import res_unet

    if not split_levels:
        monkeypatch.setattr(res_unet, "SPLIT_CONCATENATION_DEVICES", ())
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


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_channel_stem_conv_equals_the_plain_conv_in_inference(channels_last):
    torch.manual_seed(0)
    conv = conv3d(1, 6, (3, 3, 1))
    assert isinstance(conv, OneChannelConv3d)
    reference = nn.Conv3d(1, 6, (3, 3, 1), padding=(1, 1, 0))
    reference.load_state_dict(conv.state_dict())  # same parameters as nn.Conv3d
    x = torch.randn(2, 1, 9, 8, 7)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv, x = conv.to(memory_format=layout), x.contiguous(memory_format=layout)
    expected = reference(x)  # grad enabled: nn.Conv3d's own path
    with torch.inference_mode():
        out = conv(x)  # the zero second channel
    assert out.shape == expected.shape == (2, 6, 9, 8, 7)
    if channels_last:  # the fast path writes channels_last_3d directly
        assert out.is_contiguous(memory_format=layout)
    assert (out - expected.detach()).abs().max().item() <= 1e-6
    assert conv3d(2, 6, (3, 3, 1)).__class__ is nn.Conv3d  # only one input channel is special


@pytest.mark.parametrize("kernel,dilation", [((3, 3, 1), (2, 2, 1)), ((3, 3, 2), (2, 2, 1)), ((1, 1, 1), (1, 1, 1))])
def test_conv_of_concatenation_equals_conv_of_the_concatenated_tensor(kernel, dilation):
    torch.manual_seed(0)
    conv = conv3d(7, 3, kernel, dilation)
    parts = [torch.randn(1, 2, 8, 9, 6), torch.randn(1, 4, 8, 9, 6), torch.randn(1, 1, 8, 9, 6)]
    with torch.no_grad():
        expected = conv(torch.cat(parts, dim=1))
        out = conv_of_concatenation(conv, parts)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="6 channels, the conv takes 7"):
        conv_of_concatenation(conv, parts[:2])
    with pytest.raises(ValueError, match="11 channels, the conv takes 7"):
        conv_of_concatenation(conv, parts + [parts[1]])


@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_conv_as_matmul_equals_conv3d(channels_last):
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 2, 1).double()
    x = torch.randn(2, 6, 5, 7, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = conv(x)
        out = pointwise_conv_as_matmul(x, conv.weight, conv.bias)
        no_bias = pointwise_conv_as_matmul(x, conv.weight)
    assert out.shape == expected.shape == (2, 2, 5, 7, 4)
    assert (out - expected).abs().max().item() <= 1e-12
    assert (no_bias + conv.bias.view(1, 2, 1, 1, 1) - expected).abs().max().item() <= 1e-12
    if channels_last:  # read in place, written channels_last_3d
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    # with autograd (the bias is not added in place to a tensor that needs its grad)
    weight = conv.weight.detach().clone().requires_grad_(True)
    pointwise_conv_as_matmul(x, weight, conv.bias).sum().backward()
    assert torch.allclose(weight.grad.view(2, 6), x.sum(dim=(0, 2, 3, 4)).expand(2, 6))


def test_pointwise_matmul_is_chosen_only_for_1x1x1_convs_of_cuda_channels_last_tensors():
    x = torch.randn(1, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    assert not _pointwise_as_matmul(nn.Conv3d(4, 1, 1), x)          # CPU: oneDNN's conv measured faster
    assert not _pointwise_as_matmul(nn.Conv3d(4, 1, 3), x)


def test_network_inference_with_the_matmul_head_gives_the_same_logits(monkeypatch):
    from planar3d.networks import layers

    torch.manual_seed(0)
    net = PlanarResUNet(PlanarResUNetConfig(width=0.0625, plane_axis=2)).eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, 32, 32, 16).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = net(x)
        chosen = []
        monkeypatch.setattr(layers, "_pointwise_as_matmul", lambda conv, part: chosen.append(tuple(conv.kernel_size)) or
                            tuple(conv.kernel_size) == (1, 1, 1))  # as on CUDA
        out = net(x)
    assert (1, 1, 1) in chosen  # the head went through the matrix product
    assert out.shape == expected.shape and (out - expected).abs().max().item() <= 1e-5


def _reference_conv_relu(calls):
    """What ``torch.cudnn_convolution_relu`` computes, on the CPU, recording each call's input."""
    def conv_relu(x, weight, bias, stride, padding, dilation, groups):
        calls.append((tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last_3d)))
        return torch.relu(torch.nn.functional.conv3d(x, weight, bias, stride, padding, dilation, groups))
    return conv_relu


@pytest.mark.parametrize("config", [
    PlanarResUNetConfig(width=0.125, deepest_kernel_depth=2),
    PlanarResUNetConfig(width=0.0625, plane_axis=0, in_channels=3, out_channels=2),
    PlanarResUNetConfig(width=0.0625, norm="instance"),
], ids=["published-even-deepest", "axis0-rgb", "instance-norm"])
@pytest.mark.parametrize("split", [False, True], ids=["one-conv-per-concatenation", "split-concatenations"])
def test_fused_conv_relu_inference_equals_the_eager_network(config, split, monkeypatch):
    # CUDA inference computes conv + bias + ReLU as one cuDNN call and instance norm in place.
    # Forced onto the CPU here with a reference for that call, the network gives the eager
    # numbers: the padding of even kernels and the weights' layout reach the call right.
    from planar3d.networks import layers, res_unet

    monkeypatch.setattr(res_unet, "SPLIT_CONCATENATION_DEVICES", ("cpu",) if split else ())
    torch.manual_seed(0)
    net = PlanarResUNet(config).eval()
    x = torch.randn(1, config.in_channels, 20, 17, 19)
    with torch.inference_mode():
        expected = net(x)
    calls = []
    monkeypatch.setattr(layers, "FUSED_CONV_RELU_DEVICES", ("cpu",))
    monkeypatch.setattr(layers, "CHANNELS_LAST_INSTANCE_NORM_DEVICES", ("cpu",))
    monkeypatch.setattr(layers, "_cudnn_conv_relu", _reference_conv_relu(calls))
    with torch.inference_mode():
        fused = net(x)
    assert (fused - expected).abs().max().item() <= 1e-5
    # VGG-16 blocks 1-4; the bottleneck's two and two a decoder level, of which the first is
    # computed from the parts of the concatenation (unfused) where concatenations are split
    encoder_convs, decoder_convs = 2 + 2 + 3 + 3, 2 + (1 if split else 2) * 4
    assert len(calls) == encoder_convs + (0 if config.norm else decoder_convs)
    assert calls[0][0][1] == config.in_channels
    assert all(layout for _, _, layout in calls)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype reaches the call, as for a conv
        with torch.inference_mode():
            net(x)
    assert calls[-1][1] == torch.bfloat16
    calls.clear()
    net(x)  # training's forward (autograd): never fused, since the fused call has no backward
    assert calls == []


def _in_place_norm_on_the_cpu(monkeypatch) -> list:
    """Switch the in-place instance norm on for the CPU; the list it returns grows by one a call."""
    from planar3d.networks import layers

    calls = []
    real = layers.instance_norm_channels_last
    monkeypatch.setattr(layers, "instance_norm_channels_last", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(layers, "CHANNELS_LAST_INSTANCE_NORM_DEVICES", ("cpu",))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_in_place_equals_pytorch_instance_norm(dtype, monkeypatch):
    # CUDA inference normalises channels_last_3d activations without copying them; forced onto
    # the CPU here, it gives PyTorch's instance norm (to float32 or bf16 rounding)
    from planar3d.networks import layers

    torch.manual_seed(0)
    norm = layers.normalization("instance", 6)
    assert isinstance(norm, layers.InstanceNorm3d)
    reference = nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    reference.load_state_dict(norm.state_dict())  # the same parameters and state dict
    x = (torch.randn(2, 6, 9, 8, 7) * 3 + 5).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = reference(x.float())
    seen = _in_place_norm_on_the_cpu(monkeypatch)
    with torch.no_grad():
        out = norm(x)
        assert norm(x.contiguous()).dtype == dtype  # channels-first input: PyTorch's own path
    assert len(seen) == 1
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last_3d)
    if dtype == torch.float32:
        assert (out - expected).abs().max().item() <= 1e-5
    else:  # no further from the float32 result than PyTorch's own bf16 kernel
        with torch.no_grad():
            pytorch_bf16 = reference.to(dtype)(x)
        pytorch_error = (pytorch_bf16.float() - expected).abs().max().item()
        assert (out.float() - expected).abs().max().item() <= pytorch_error
    out = norm(x.float())  # with autograd: PyTorch's kernels and their backward
    assert len(seen) == 1
    assert (out - expected).abs().max().item() <= 1e-5


def _whole_tensor_norm(x, weight, bias, eps, out=None, relu=False):
    """The CUDA algorithm of the in-place norm, run on CPU tensors."""
    from planar3d.networks.layers import _instance_norm_whole

    return _instance_norm_whole(x, weight, bias, eps, torch.empty_like(x) if out is None else out, relu)


@pytest.mark.parametrize("algorithm", ["blocks (CPU)", "whole tensor (CUDA)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_in_place_is_stable_where_most_voxels_hold_one_value(dtype, algorithm):
    # a conv's output over a skull-stripped scan: the bias everywhere but a small region, so the
    # mean is hundreds of standard deviations from zero. "Mean square less squared mean" cancels
    # there (it changed a trained model's patient26 Dice); the centred variance does not. Both
    # algorithms: the CPU's (blocks of voxels) and CUDA's, run here on the CPU.
    from planar3d.networks.layers import instance_norm_channels_last as blocks

    instance_norm_channels_last = blocks if algorithm.startswith("blocks") else _whole_tensor_norm

    torch.manual_seed(0)
    x = torch.full((1, 3, 16, 16, 16), 40.0)
    x[:, :, 6:9, 6:9, 6:9] += torch.randn(1, 3, 3, 3, 3)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    weight, bias = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 1.0])
    reference = nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        reference.weight.copy_(weight), reference.bias.copy_(bias)
        expected = reference(x.float())
        out = instance_norm_channels_last(x, weight, bias, 1e-5)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last_3d)
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.02) * scale


@pytest.mark.parametrize("algorithm", ["blocks (CPU)", "whole tensor (CUDA)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_written_over_its_input_with_relu_equals_pytorch(dtype, algorithm, monkeypatch):
    # The CPU normalises a channels_last_3d instance in blocks of voxels; a conv unit in inference
    # has it overwrite the conv's output and apply the ReLU. Blocks of 100 of 9x8x7 = 504 voxels:
    # five full blocks and a remainder, two instances. CUDA's algorithm takes the same arguments.
    from planar3d.networks import layers

    norm = layers.instance_norm_channels_last if algorithm.startswith("blocks") else _whole_tensor_norm

    monkeypatch.setattr(layers, "CPU_NORM_BLOCK_VOXELS", 100)
    torch.manual_seed(0)
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    x = (torch.randn(2, 6, 9, 8, 7) * 3 + 5).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    original = x.clone()
    with torch.no_grad():
        expected = torch.relu(F.instance_norm(original.float(), weight=weight, bias=bias, eps=1e-5))
        pytorch_error = (torch.relu(F.instance_norm(original, weight=weight.to(dtype), bias=bias.to(dtype), eps=1e-5)).float()
                         - expected).abs().max().item()
        out = norm(x, weight, bias, 1e-5, out=x, relu=True)
    assert out.data_ptr() == x.data_ptr() and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert (out.float() >= 0).all()
    # float32: to rounding; bf16: rounded once, no further from the float32 result than PyTorch's bf16
    assert (out.float() - expected).abs().max().item() <= (1e-5 if dtype == torch.float32 else pytorch_error)
    with pytest.raises(ValueError, match="channels_last_3d"):  # it would write to a copy of another layout
        layers.instance_norm_channels_last(original, weight, bias, 1e-5, out=torch.empty(original.shape, dtype=dtype))


def test_instance_norm_in_place_gives_the_network_pytorchs_logits_on_a_skull_stripped_scan(monkeypatch):
    # The network as predict runs it on the CPU (channels_last_3d; at this size oneDNN hands the
    # upper decoder levels channels_last activations, so the in-place norm runs there), on zeros
    # around a head, with biases of a trained model's size: most voxels of each channel hold one
    # value far from zero. The first in-place norm (mean square less squared mean) was 0.08 off
    # here; it moved a trained model's patient26 Dice from 0.406 to 0.348.
    from planar3d.networks import layers

    torch.manual_seed(0)
    layout = torch.channels_last_3d
    net = PlanarResUNet(PlanarResUNetConfig(width=0.0625, norm="instance")).eval().to(memory_format=layout)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                module.bias.add_(5.0)
    x = torch.zeros(1, 1, 96, 112, 96)
    x[:, :, 40:56, 40:60, 40:56] = torch.randn(16, 20, 16) + 3
    x = x.contiguous(memory_format=layout)
    monkeypatch.setattr(layers, "CHANNELS_LAST_INSTANCE_NORM_DEVICES", ())
    with torch.inference_mode():
        expected = net(x)
    calls = _in_place_norm_on_the_cpu(monkeypatch)
    with torch.inference_mode():
        out = net(x)
    assert len(calls) >= 2
    assert (out - expected).abs().max().item() <= 1e-5
