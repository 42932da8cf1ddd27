"""Losses: known values on tiny tensors, finite values and gradients on all-background batches."""

from __future__ import annotations

import pytest
import torch

from planar3d.errors import ConfigError
from planar3d.losses import LOSSES, BCEDiceLoss, build_loss, soft_dice

BIG = 30.0  # a logit whose sigmoid is 1 - 1e-13


def test_soft_dice_hand_computed_2x2():
    p = torch.tensor([[[[0.8, 0.2], [0.6, 0.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # intersection 1.4, sum p 1.6, sum t 2: 2.8 / 3.6
    assert soft_dice(p, t, smooth=0.0).item() == pytest.approx(2.8 / 3.6, rel=1e-6)


def test_bce_dice_hand_computed():
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # BCE of sigmoid 0.5 is log 2; soft Dice = 2*0.5 / (2 + 1) = 1/3
    expected = torch.log(torch.tensor(2.0)).item() + (1 - 1 / 3)
    assert BCEDiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["bce_dice", "dice", "dice_ce", "dice_focal", "tversky", "generalized_dice"])
def test_perfect_prediction_gives_near_zero_dice_part(name):
    target = torch.zeros(2, 1, 4, 4, 4)
    target[:, :, 1:3, 1:3, 1:3] = 1
    logits = (target * 2 - 1) * BIG
    value = build_loss(name)(logits, target).item()
    assert value == pytest.approx(0.0, abs=1e-3)


def test_monai_dice_matches_hand_value():
    logits = torch.zeros(1, 1, 2, 2, 1)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2, 1)
    loss = build_loss("dice", smooth_nr=0.0, smooth_dr=0.0)
    assert loss(logits, target).item() == pytest.approx(1 - 1 / 3, rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("batch_dice", [True, False])
def test_all_background_batch_is_finite_with_finite_gradients(name, batch_dice):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4, 4)
    value = build_loss(name, batch_dice=batch_dice)(logits, target)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()


def test_batch_dice_differs_from_per_sample_dice():
    target = torch.zeros(2, 1, 2, 2, 2)
    target[0, 0, 0, 0, 0] = 1
    logits = torch.zeros(2, 1, 2, 2, 2)
    batch = build_loss("dice", batch_dice=True)(logits, target).item()
    per_sample = build_loss("dice", batch_dice=False)(logits, target).item()
    assert batch != pytest.approx(per_sample)


def test_unknown_loss_and_bad_option_are_config_errors():
    with pytest.raises(ConfigError, match="unknown loss 'dyce'"):
        build_loss("dyce")
    with pytest.raises(ConfigError, match="tversky"):
        build_loss("tversky", not_an_option=1)
