"""One training epoch and one validation pass.

- :func:`train_one_epoch`: forward (autocast with ``amp``), loss (a non-finite loss stops before the
  update), backward, optional gradient clipping, step; returns mean loss, seconds, voxels/second,
  the ratio of predicted to present lesion voxels in the training patches and the share of their
  voxels predicted lesion;
- :func:`validate`: whole validation volumes, run with the window ``planar3d predict`` will use
  (:func:`planar3d.inference.inference_window`), scored at each threshold, one chosen by
  ``validation.criterion``.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch

from planar3d.errors import InputError, TrainingError

from pipelines.config import TrainConfig
from pipelines.train_process import Dist, _unwrap


def train_one_epoch(model, loader_batches, loss_fn, optimizer, config: TrainConfig, device, dist: Dist, epoch: int,
                    total_steps: Optional[int] = None) -> Dict[str, float]:
    """One pass over the training patches; returns mean loss, seconds, voxels per second,
    ``train_predicted_to_lesion`` (lesion voxels predicted / present, NaN without lesion voxels)
    and ``train_predicted_fraction`` (lesion voxels predicted / all voxels of the patches).

    ``total_steps`` (an estimate: volumes x samples per volume / batch size) gives the progress
    bar its total and ETA."""
    from tqdm import tqdm

    from planar3d.inference import autocast_context

    model.train()
    memory_format = torch.channels_last_3d if device.type == "cuda" and config.channels_last else torch.contiguous_format
    total_loss, steps, voxels = 0.0, 0, 0
    # lesion voxels predicted (logit > 0) and present in the patches, summed on the device and read
    # once at the end: their ratio shows over- or under-segmentation, and 0 a collapsed network
    predicted = torch.zeros((), dtype=torch.float64, device=device)
    present = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    bar = tqdm(loader_batches, desc=f"epoch {epoch + 1}/{config.optim.epochs}", disable=not dist.main, leave=False, unit="step",
               total=total_steps)
    for image, label in bar:
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        if config.network.in_channels > 1:
            image = image.expand(-1, config.network.in_channels, -1, -1, -1)
        image = image.contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, config.amp):
            logits = model(image)
        loss = loss_fn(logits, label)
        # The step's one wait for the device: the loss value, read once, both for the check and
        # for the running mean. Here (after the forward) rather than after optimizer.step(), so
        # the device runs this step's backward and update while the host prepares and launches
        # the next batch.
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            # stop before the step: a NaN update would spread to every weight, and a NaN model
            # could still become best.pt (a lesion F1 of 0 beats the initial -1)
            raise TrainingError(
                f"epoch {epoch + 1}, step {steps + 1}: the training loss is {loss_value:g}; last.pt keeps epoch {epoch} "
                f"(input finite: {bool(torch.isfinite(image).all())}); lower optim.lr or check the augmentation")
        predicted += (logits.detach() > 0).sum()
        present += (label > 0.5).sum()
        loss.backward()
        if config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.optim.grad_clip)
        optimizer.step()
        total_loss += loss_value
        steps += 1
        voxels += label.numel()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / steps:.4f}", vox_s=f"{voxels / max(elapsed, 1e-9):.3g}")
    seconds = time.perf_counter() - start
    if steps == 0:
        raise InputError("training data", "no training patch was produced (no training cases on this rank?)")
    counted = torch.tensor(float(voxels), dtype=torch.float64, device=device)
    if dist.world_size > 1:
        counts = torch.stack([predicted, present, counted])
        torch.distributed.all_reduce(counts)
        predicted, present, counted = counts[0], counts[1], counts[2]
    predicted, present, counted = float(predicted), float(present), float(counted)
    return {"train_loss": total_loss / steps, "seconds": seconds, "voxels_per_second": voxels * dist.world_size / max(seconds, 1e-9),
            "train_predicted_to_lesion": predicted / present if present else float("nan"),
            "train_predicted_fraction": predicted / counted}


def validate(model, volumes, config: TrainConfig, device):
    """Score the validation volumes at each threshold and minimum lesion size and choose the pair
    by ``validation.criterion``.

    Returns the :class:`planar3d.thresholds.ThresholdChoice`: its ``score`` (the criterion, which
    also picks the best epoch), ``threshold`` and the per-threshold table (Dice, lesion-wise F1,
    PPV, sensitivity, predicted lesions). A threshold keeps ``probability > t``, as prediction does.
    """
    from planar3d.inference import inference_window, predict_probabilities
    from planar3d.thresholds import choose_threshold

    model = _unwrap(model)
    model.eval()
    # the window planar3d predict will run this checkpoint with (InferenceSettings.from_checkpoint)
    window = inference_window(config.validation.roi_size, model.config.plane_axis)
    probabilities, labels, spacings = [], [], []
    for _, image, label, spacing in volumes:
        probabilities.append(predict_probabilities(
            model, image, roi_size=window, overlap=config.validation.overlap,
            device=device, precision="auto" if config.amp else "fp32", in_channels=config.network.in_channels,
        ))
        labels.append(label)
        spacings.append(spacing)
    return choose_threshold(probabilities, labels, spacings, config.validation.thresholds, config.validation.criterion,
                            min_lesion_sizes=config.validation.min_lesion_sizes,
                            core_thresholds=config.validation.core_thresholds)
