"""The 2D-to-3D weight mapping is exact: planar conv3d == 2D conv on every slice."""

import pytest
import torch
import torch.nn.functional as F

from planar3d.inflate import (
    encoder_key_map,
    i3d_kernel,
    planar_kernel,
    sum_input_channels,
    vgg16_to_planar_encoder,
)
from planar3d.networks import PlanarVGGEncoder
from planar3d.networks.layers import along_plane


def conv2d_every_slice(volume, weight, bias, axis):
    """Apply a 2D conv to every slice of ``volume`` (N, C, D, H, W) along spatial ``axis``."""
    slices = [F.conv2d(volume.select(2 + axis, s), weight, bias, padding=1) for s in range(volume.shape[2 + axis])]
    return torch.stack(slices, dim=2 + axis)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_planar_conv_equals_2d_conv_slice_by_slice(axis):
    torch.manual_seed(axis)
    weight, bias = torch.randn(8, 5, 3, 3), torch.randn(8)
    volume = torch.randn(2, 5, 7, 9, 6)
    planar = F.conv3d(volume, planar_kernel(weight, axis), bias, padding=along_plane(0, 1, axis))
    expected = conv2d_every_slice(volume, weight, bias, axis)
    assert planar.shape == expected.shape
    assert (planar - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_planar_kernel_shape_and_values(axis):
    weight = torch.randn(4, 3, 3, 3)
    kernel = planar_kernel(weight, axis)
    assert kernel.shape[2 + axis] == 1
    assert torch.equal(kernel.squeeze(2 + axis), weight)


def test_planar_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="plane_axis"):
        planar_kernel(torch.zeros(1, 1, 3, 3), 3)
    with pytest.raises(ValueError, match="2D conv kernel"):
        planar_kernel(torch.zeros(1, 1, 3, 3, 3), 0)


def test_summed_stem_equals_rgb_stem_on_repeated_grayscale():
    torch.manual_seed(1)
    weight, bias = torch.randn(64, 3, 3, 3), torch.randn(64)
    gray = torch.randn(1, 1, 5, 12, 10)
    rgb = F.conv3d(gray.repeat(1, 3, 1, 1, 1), planar_kernel(weight, 0), bias, padding=(0, 1, 1))
    mono = F.conv3d(gray, planar_kernel(sum_input_channels(weight), 0), bias, padding=(0, 1, 1))
    assert (rgb - mono).abs().max().item() < 1e-5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_i3d_equals_2d_on_volume_constant_along_axis(axis):
    torch.manual_seed(2)
    weight, bias, depth = torch.randn(6, 4, 3, 3), torch.randn(6), 3
    shape = [1, 4, 8, 9, 7]
    one_slice = torch.randn(*[1 if i == 2 + axis else n for i, n in enumerate(shape)])
    volume = one_slice.expand(*shape).contiguous()
    kernel = i3d_kernel(weight, axis, depth)
    assert kernel.shape[2 + axis] == depth
    out = F.conv3d(volume, kernel, bias, padding=along_plane(depth // 2, 1, axis))
    expected = conv2d_every_slice(volume, weight, bias, axis)
    # zero padding along the axis reaches the end slices; every interior slice must match
    inner = shape[2 + axis] - 2 * (depth // 2)
    difference = out.narrow(2 + axis, depth // 2, inner) - expected.narrow(2 + axis, depth // 2, inner)
    assert difference.abs().max().item() < 1e-5
    # At the end slices the zero padding makes i3d differ from 2D: the mapping is not exact there.
    assert (out.select(2 + axis, 0) - expected.select(2 + axis, 0)).abs().max().item() > 1e-3


def test_mapping_is_pure_and_complete(vgg16_state):
    before = {k: v.clone() for k, v in vgg16_state.items()}
    mapped = vgg16_to_planar_encoder(vgg16_state, plane_axis=1, in_channels=1)
    assert all(torch.equal(before[k], vgg16_state[k]) for k in before)  # input untouched
    assert len(encoder_key_map()) == 10  # VGG-16 blocks 1-4 hold 10 convs
    assert set(mapped) == {f"{p}.{s}" for p in encoder_key_map().values() for s in ("weight", "bias")}
    assert mapped["blocks.0.0.weight"].shape == (64, 1, 3, 1, 3)
    assert mapped["blocks.3.4.weight"].shape == (512, 512, 3, 1, 3)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_planar_encoder_equals_vgg16_features_slice_by_slice(vgg16_state, axis, in_channels):
    """With in-plane pooling the whole encoder is VGG-16 features[:24] applied to each slice."""
    from planar3d.vgg import VGG16

    vgg = VGG16().double().eval()
    vgg.load_state_dict(vgg16_state)
    encoder = PlanarVGGEncoder(in_channels, axis, [along_plane(1, 2, axis)] * 4).double().eval()
    encoder.load_state_dict(vgg16_to_planar_encoder(vgg16_state, axis, in_channels))
    torch.manual_seed(3)
    shape = [1, 1, 32, 32, 32]
    shape[2 + axis] = 3
    gray = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        _, pooled = encoder(gray if in_channels == 1 else gray.repeat(1, 3, 1, 1, 1))
        expected = torch.stack(
            [vgg.features[:24](gray.select(2 + axis, s).repeat(1, 3, 1, 1)) for s in range(3)], dim=2 + axis
        )
    assert pooled.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    assert (pooled - expected).abs().max().item() <= 1e-6 * scale  # float32 summation of the RGB stem rounds at ~1e-7
