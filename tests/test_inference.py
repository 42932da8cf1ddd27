"""Inference: whole-volume passes, slab plans with exact margins, windows, blending and flip TTA
give what the model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from planar3d.inference import (
    EXACT_MARGIN_PLANES, estimated_forward_bytes, plan_slabs, predict_probabilities, prepare_for_inference,
)
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig


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



def test_slab_plan_tiles_the_axis_aligned_with_margins():
    slabs = plan_slabs(159, 96, 16, 16)
    assert [(s.start, s.stop, s.keep_start, s.keep_stop) for s in slabs] == [(0, 96, 0, 80), (64, 159, 80, 159)]
    for length, max_planes, margin, align in [(200, 60, 8, 16), (37, 20, 3, 1), (160, 160, 16, 16), (17, 64, 48, 16)]:
        slabs = plan_slabs(length, max_planes, margin, align)
        kept = np.zeros(length, int)
        for s in slabs:
            kept[s.keep_start:s.keep_stop] += 1
            assert s.start % align == 0 and s.stop - s.start <= max(max_planes, length if len(slabs) == 1 else 0)
            assert s.start <= s.keep_start and s.keep_stop <= s.stop
            assert s.keep_start - s.start in (0, -(-margin // align) * align) or s.start == 0
        assert (kept == 1).all()
    with pytest.raises(ValueError, match="no room"):
        plan_slabs(100, 40, 16, 16)


def test_a_tiny_memory_budget_still_predicts_with_smaller_margins():
    net = _net()
    volume = np.random.default_rng(2).normal(size=(8, 8, 40)).astype(np.float32)
    whole = predict_probabilities(net, volume)
    starved = predict_probabilities(net, volume, margin=16, memory_budget=1)  # 16-plane slabs, no margin
    assert starved.shape == whole.shape and np.isfinite(starved).all()
    assert np.abs(starved - whole).max() < 0.05


def test_progress_counts_the_slabs_of_a_long_scan(capsys):
    net = _net()
    volume = np.random.default_rng(2).normal(size=(8, 8, 40)).astype(np.float32)
    quiet = predict_probabilities(net, volume, margin=16, memory_budget=1)
    assert capsys.readouterr().err == ""
    shown = predict_probabilities(net, volume, margin=16, memory_budget=1, progress=True)
    assert "slabs" in capsys.readouterr().err and np.array_equal(shown, quiet)


@pytest.mark.parametrize("depth", [2, 3])
def test_receptive_field_along_the_plane_axis_fits_the_exact_margin(depth):
    # EXACT_MARGIN_PLANES rests on this: an output plane depends on at most 45 planes each side
    torch.manual_seed(0)
    net = PlanarResUNet(PlanarResUNetConfig(width=1 / 16, deepest_kernel_depth=depth)).double()
    x = torch.randn(1, 1, 4, 4, 192, dtype=torch.double, requires_grad=True)
    y = net(x)
    reach = 0
    for plane in range(80, 112):  # every phase of the 16-plane pooling grid
        used = torch.autograd.grad(y[0, 0, :, :, plane].sum(), x, retain_graph=True)[0].abs().sum(dim=(0, 1, 2, 3)).nonzero()
        reach = max(reach, plane - int(used.min()), int(used.max()) - plane)
    # dead ReLUs of a random net can only hide dependencies, so this is a lower bound: 45 was seen
    assert 32 < reach <= EXACT_MARGIN_PLANES


def _net(**kwargs):
    torch.manual_seed(0)
    return PlanarResUNet(PlanarResUNetConfig(width=1 / 16, deepest_kernel_depth=2, **kwargs)).eval()


def test_exact_margin_slabs_equal_the_whole_volume_pass():
    net = _net()
    volume = np.random.default_rng(0).normal(size=(12, 10, 131)).astype(np.float32)
    whole = predict_probabilities(net, volume)
    budget = estimated_forward_bytes(net, volume.shape, "cpu") * 120 // 131
    slabs = predict_probabilities(net, volume, margin=EXACT_MARGIN_PLANES, memory_budget=budget)
    assert np.abs(slabs - whole).max() <= 1e-6
    # a small margin is an approximation, still close on this random net
    budget = estimated_forward_bytes(net, volume.shape, "cpu") * 48 // 131
    approximate = predict_probabilities(net, volume, margin=16, memory_budget=budget)
    assert np.abs(approximate - whole).max() < 1e-2


def test_channels_last_whole_pass_equals_the_plain_forward():
    net = _net(plane_axis=0, in_channels=3)
    volume = np.random.default_rng(1).normal(size=(19, 14, 11)).astype(np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(volume)[None, None].expand(1, 3, -1, -1, -1)))[0, 0].numpy()
    fast = prepare_for_inference(net, "cpu")
    assert next(p for p in fast.parameters() if p.dim() == 5 and p.shape[1] > 1).is_contiguous(memory_format=torch.channels_last_3d)
    out = predict_probabilities(fast, volume, in_channels=3)
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert np.abs(out - expected).max() <= 1e-6
    # flip TTA: mean of the plain and flipped passes
    tta = predict_probabilities(fast, volume, in_channels=3, flip_axes=(1,))
    flipped = predict_probabilities(fast, volume[:, ::-1].copy(), in_channels=3)[:, ::-1]
    assert np.abs(tta - (out + flipped) / 2).max() <= 1e-6


def test_precision_resolution_and_cpu_flags(tmp_path):
    from planar3d.inference import cpu_has_bf16_units, resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    with_units, without = tmp_path / "a", tmp_path / "b"
    with_units.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_has_bf16_units(str(with_units)) is True
    assert cpu_has_bf16_units(str(without)) is False
    assert cpu_has_bf16_units(str(tmp_path / "missing")) is None


def test_whole_plane_slabs_run_as_the_whole_volume_and_windows_stay():
    from planar3d.inference import inference_window

    assert inference_window(None, 2) is None
    assert inference_window([-1, -1, 32], 2) is None  # whole planes: the whole-volume pass
    assert inference_window([32, -1, -1], 0) is None
    assert inference_window([-1, -1, 32], 0) == (-1, -1, 32)  # not whole planes of this network
    assert inference_window([96, 96, 32], 2) == (96, 96, 32)


def test_validation_scores_the_probabilities_predict_produces():
    """Validation during training runs a whole-plane slab setting the way ``planar3d predict``
    runs it (one whole-volume pass), so its threshold is chosen on predict's probabilities; with
    instance norm, 4-plane slabs would give other ones."""
    from pipelines.config import load_config
    from pipelines.train_epoch import validate
    from planar3d.thresholds import choose_threshold

    net = _net()
    image = np.random.default_rng(2).normal(size=(16, 16, 24)).astype(np.float32)
    whole = predict_probabilities(net, image)
    slabs = predict_probabilities(net, image, roi_size=[-1, -1, 4], overlap=0.25)
    assert np.abs(slabs - whole).max() > 1e-3  # the two settings differ on this net
    # a reference and thresholds inside the random net's narrow range of probabilities
    label = (whole > np.quantile(whole, 0.9)).astype(np.uint8)
    thresholds = [round(float(np.quantile(whole, q)), 6) for q in (0.8, 0.9, 0.95)]
    config = load_config("default", ["validation.roi_size=[-1,-1,4]", "validation.overlap=0.25",
                                     f"validation.thresholds={thresholds}", "amp=false", "network.width=0.0625"])
    choice = validate(net, [("case", image, label, (1.0, 1.0, 1.0))], config, "cpu")

    def scored(probability):
        return choose_threshold([probability], [label], [(1.0, 1.0, 1.0)], thresholds, config.validation.criterion,
                                min_lesion_sizes=config.validation.min_lesion_sizes,
                                core_thresholds=config.validation.core_thresholds)

    assert repr(choice) == repr(scored(whole))  # repr: the table may hold NaN PPVs
    assert repr(choice) != repr(scored(slabs))


def test_how_the_model_ran_is_reported_and_instance_norm_slabs_warn():
    """Under instance norm a slab is normalised by its own statistics, so even the exact margin
    does not give the whole pass: the caller is told, with a warning to pass on."""
    from planar3d.inference import uses_instance_norm

    volume = np.random.default_rng(0).normal(size=(12, 10, 131)).astype(np.float32)
    plain, normed = _net(), _net(norm="instance")
    assert not uses_instance_norm(plain) and uses_instance_norm(normed)
    budget = estimated_forward_bytes(normed, volume.shape, "cpu") * 120 // 131
    for net, warned in ((plain, False), (normed, True)):
        whole_passes, slab_passes = {}, {}
        whole = predict_probabilities(net, volume, passes=whole_passes)
        slabs = predict_probabilities(net, volume, margin=EXACT_MARGIN_PLANES, memory_budget=budget, passes=slab_passes)
        assert whole_passes == {"mode": "whole"}
        assert slab_passes["mode"] == "slabs" and slab_passes["slabs"] >= 2
        assert ("warning" in slab_passes) == warned
        assert (np.abs(slabs - whole).max() > 1e-3) == warned  # exact margins: equal without instance norm only
    windows = {}
    predict_probabilities(plain, volume, roi_size=(8, 8, 32), passes=windows)
    assert windows == {"mode": "windows"}
