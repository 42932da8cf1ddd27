"""Segmentation losses on logits, chosen by name.

All losses take the network's logits ``(N, 1, *spatial)`` and a binary target of the same
shape; the sigmoid is applied inside. ``batch_dice=True`` computes Dice over the whole batch
(one intersection and one union summed over all samples) instead of averaging per-sample Dice:
patches without lesion then do not give a loss of 1 (or 0) on their own, which keeps the
gradient useful with very unbalanced data (lesions are well under 1 % of the voxels).

Names:

- ``bce_dice``: the paper's binary cross-entropy + (1 - soft Dice) on the sigmoid output;
- ``dice``, ``dice_ce``, ``dice_focal``, ``tversky``, ``generalized_dice``: MONAI's
  ``DiceLoss``, ``DiceCELoss``, ``DiceFocalLoss``, ``TverskyLoss``, ``GeneralizedDiceLoss``
  with ``sigmoid=True``.

Example:
    >>> import torch
    >>> loss = build_loss("bce_dice")
    >>> logits = torch.zeros(2, 1, 4, 4, 4); target = torch.zeros(2, 1, 4, 4, 4)
    >>> bool(torch.isfinite(loss(logits, target)))
    True
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from planar3d.errors import ConfigError


def soft_dice(probabilities: torch.Tensor, target: torch.Tensor, batch: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)``, averaged over samples unless ``batch``."""
    dims = tuple(range(2, probabilities.ndim))
    if batch:
        dims = (0,) + dims
    intersection = (probabilities * target).sum(dims)
    denominator = probabilities.sum(dims) + target.sum(dims)
    return ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


class BCEDiceLoss(nn.Module):
    """Binary cross-entropy + (1 - soft Dice) of the sigmoid output (the published loss).

    Args:
        batch: batch Dice (see the module docstring).
        smooth: added to numerator and denominator of the Dice (an empty prediction of an empty
            target gives Dice 1, loss 0, and finite gradients).
        lambda_bce, lambda_dice: weights of the two terms.
    """

    def __init__(self, batch: bool = True, smooth: float = 1e-5, lambda_bce: float = 1.0, lambda_dice: float = 1.0):
        super().__init__()
        self.batch, self.smooth = batch, smooth
        self.lambda_bce, self.lambda_dice = lambda_bce, lambda_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice(torch.sigmoid(logits), target, batch=self.batch, smooth=self.smooth)
        return self.lambda_bce * bce + self.lambda_dice * (1.0 - dice)


def _monai(class_name: str) -> Callable[..., nn.Module]:
    def make(batch: bool, **kwargs: Any) -> nn.Module:
        import monai.losses

        return getattr(monai.losses, class_name)(sigmoid=True, batch=batch, **kwargs)

    return make


LOSSES: Dict[str, Callable[..., nn.Module]] = {
    "bce_dice": lambda batch, **kwargs: BCEDiceLoss(batch=batch, **kwargs),
    "dice": _monai("DiceLoss"),
    "dice_ce": _monai("DiceCELoss"),
    "dice_focal": _monai("DiceFocalLoss"),
    "tversky": _monai("TverskyLoss"),
    "generalized_dice": _monai("GeneralizedDiceLoss"),
}

#: Losses without a voxel-wise term: once the network predicts nothing, the sigmoid saturates and
#: their gradient vanishes, so such a collapse does not end (``pipelines.train.check_not_collapsed``).
#: A cross-entropy or focal term keeps a gradient per missed lesion voxel and can recover (four
#: ``dice_ce`` runs predicted nothing for up to 24 epochs and then learnt: docs/training.md).
REGION_ONLY_LOSSES = frozenset({"dice", "tversky", "generalized_dice"})


class _FloatLoss(nn.Module):
    """Compute the wrapped loss in float32 (bf16 autocast logits are cast up first)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target.float())


def build_loss(name: str, batch_dice: bool = True, **kwargs: Any) -> nn.Module:
    """The loss called ``name`` (see the module docstring), on logits.

    Args:
        name: one of :data:`LOSSES`.
        batch_dice: Dice over the whole batch rather than per sample.
        **kwargs: passed to the loss (e.g. ``alpha``/``beta`` for ``tversky``, ``gamma`` for
            ``dice_focal``, ``lambda_dice``/``lambda_ce`` for ``dice_ce``).

    Raises:
        ConfigError: unknown name or options the loss does not take.
    """
    if name not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {name!r} (choose from {', '.join(LOSSES)})")
    try:
        return _FloatLoss(LOSSES[name](batch=batch_dice, **kwargs))
    except TypeError as error:
        raise ConfigError(f"loss.options: {name} does not accept these options ({error})") from None
