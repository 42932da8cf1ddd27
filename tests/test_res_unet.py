"""The planar 3D res-u-net: shapes, parameter count, freezing, export."""

import pytest
import torch

from planar3d.inflate import vgg16_to_planar_encoder
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from planar3d.networks.res_unet import count_parameters

TINY = dict(width=0.0625)


def test_full_width_parameter_count():
    # VGG-16 blocks 1-4 (1-channel stem) + bottleneck + decoder, as published: 25.2 M.
    net = PlanarResUNet()
    assert count_parameters(net) == 25_229_025
    assert count_parameters(net.encoder) == 7_634_112


@pytest.mark.parametrize("plane_axis", [0, 1, 2])
@pytest.mark.parametrize("across", [(True,) * 4, (False,) * 4, (False, False, True, True)])
def test_output_shape_equals_input_shape_for_odd_sizes(plane_axis, across):
    net = PlanarResUNet(PlanarResUNetConfig(plane_axis=plane_axis, pool_across_planes=across, **TINY))
    x = torch.randn(2, 1, 13, 17, 7)
    assert net(x).shape == (2, 1, 13, 17, 7)


def test_variants_build_and_run():
    config = PlanarResUNetConfig(norm="batch", dropout=0.15, act="elu", deepest_kernel_depth=2, in_channels=3, **TINY)
    net = PlanarResUNet(config).eval()
    assert net(torch.randn(1, 3, 16, 16, 16)).shape == (1, 1, 16, 16, 16)
    i3d = PlanarResUNet(PlanarResUNetConfig(encoder_mode="i3d", **TINY))
    assert i3d.encoder.blocks[0][0].weight.shape[2:] == (3, 3, 3)


def test_monai_style_arguments_override_config():
    net = PlanarResUNet(PlanarResUNetConfig(**TINY), spatial_dims=3, in_channels=3, out_channels=2)
    assert net(torch.randn(1, 3, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="spatial_dims"):
        PlanarResUNet(spatial_dims=2)


def test_config_round_trip_and_unknown_keys():
    config = PlanarResUNetConfig(plane_axis=0, pool_across_planes=(False, True, True, True), width=0.5)
    assert PlanarResUNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown network config keys: depth"):
        PlanarResUNetConfig.from_dict({"depth": 3})


def test_frozen_encoder_is_bit_identical_after_a_step_while_decoder_changes():
    torch.manual_seed(0)
    net = PlanarResUNet(PlanarResUNetConfig(**TINY), freeze_encoder=True)
    assert net.encoder_frozen
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    loss = net(torch.randn(2, 1, 16, 16, 16)).square().mean()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(encoder_before[k], v) for k, v in net.encoder.state_dict().items())
    assert any(not torch.equal(decoder_before[k], v) for k, v in net.decoder.state_dict().items())
    net.freeze_encoder(False)
    assert not net.encoder_frozen


def test_loads_mapped_vgg16_weights(vgg16_state):
    net = PlanarResUNet(PlanarResUNetConfig(plane_axis=1))
    net.load_encoder_state(vgg16_to_planar_encoder(vgg16_state, plane_axis=1))
    assert torch.equal(net.encoder.blocks[3][4].weight.squeeze(3), vgg16_state["features.21.weight"])


def test_torch_export_matches_eager():
    torch.manual_seed(0)
    net = PlanarResUNet(PlanarResUNetConfig(**TINY)).eval()
    x = torch.randn(2, 1, 20, 33, 17)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), net(x), atol=1e-6)


def test_torchscript_matches_eager_on_any_size():
    torch.manual_seed(0)
    net = PlanarResUNet(PlanarResUNetConfig(**TINY)).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 11, 16, 9)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-6)


def test_deterministic_pooling_path_equals_max_pool():
    """The reshape + amax path used for deterministic CUDA training gives max-pool's values."""
    import torch.nn.functional as F

    from planar3d.networks.layers import block_max_pool

    x = torch.randn(2, 3, 8, 6, 4, requires_grad=True)
    for kernel in [(2, 2, 2), (1, 2, 2), (2, 2, 1)]:
        assert torch.equal(block_max_pool(x, kernel), F.max_pool3d(x, kernel, kernel))
    block_max_pool(x, (2, 2, 2)).sum().backward()
    assert torch.equal(x.grad.sum(), torch.tensor(2 * 3 * 4 * 3 * 2.0))  # one unit per window (no ties)
    net = PlanarResUNet(PlanarResUNetConfig(**TINY))
    net.use_deterministic_pooling()
    assert all(pool.deterministic for pool in net.encoder.pools)
    scripted = torch.jit.script(net)  # the flag keeps the network scriptable
    assert scripted(torch.randn(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)


def test_set_initial_probability_sets_the_head_bias_only():
    torch.manual_seed(0)
    plain = PlanarResUNet(PlanarResUNetConfig(width=0.0625))
    torch.manual_seed(0)
    primed = PlanarResUNet(PlanarResUNetConfig(width=0.0625))
    primed.set_initial_probability(0.01)
    # logit(0.01), and every other parameter the same seed's (no random number is drawn)
    assert torch.equal(primed.head.bias, torch.full_like(primed.head.bias, -4.59511985013459))
    for (name, a), (_, b) in zip(plain.named_parameters(), primed.named_parameters()):
        if name != "head.bias":
            assert torch.equal(a, b), name
    # the untrained network's output moves towards 1 %: the head's input is the same, its bias lower
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        shift = primed(x) - plain(x)
    assert torch.allclose(shift, (primed.head.bias - plain.head.bias).view(1, -1, 1, 1, 1).expand_as(shift), atol=1e-5)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"probability must be in \(0, 1\)"):
            primed.set_initial_probability(bad)
