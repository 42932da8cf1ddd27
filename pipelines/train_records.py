"""What a training run records: checkpoints, metrics, ``run.json``, and the case split it records.

- :class:`RunState`: what ``last.pt`` carries from one epoch to the next; :func:`model_checkpoint`
  and :func:`save_checkpoints` (``best.pt`` when improved, ``last.pt`` with the resume state);
- :func:`write_metrics_csv` (``metrics.csv``) and :func:`open_tensorboard` (``tensorboard/``);
- ``run.json``: :func:`write_run_json`, with :func:`data_record` (each file's sha256) and
  :func:`sampling_record` (how patches are drawn);
- :class:`CaseSplit` / :func:`prepare_cases`: the fold's checked training cases and its validation
  cases (whole hosts with ``validation.hold_out_hosts``), as ``run.json`` records them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from planar3d.checkpoint import ModelCheckpoint
from planar3d.errors import InputError
from planar3d.io import atomic_write_text, json_safe, sha256_file, write_json
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3

from pipelines.config import TrainConfig
from pipelines import data as data_module
from pipelines.train_process import _unwrap, log, rng_state

# --- checkpoints and metrics --------------------------------------------------------------------


@dataclass
class RunState:
    """What ``last.pt`` carries from one epoch to the next."""

    epoch: int = 0  # epochs completed
    best_metric: float = -1.0
    best_threshold: float = 0.5
    best_epoch: int = 0
    history: List[dict] = field(default_factory=list)
    best_min_lesion_size: float = MIN_LESION_SIZE_MM3
    best_core_threshold: Optional[float] = None


def model_checkpoint(model, config: TrainConfig, net_config, threshold: float, epoch: int, metrics: dict, info: dict,
                     min_lesion_size: float = MIN_LESION_SIZE_MM3, core_threshold: Optional[float] = None) -> ModelCheckpoint:
    """The ``planar3d-model/1`` checkpoint of the model as it is now (with the post-processing
    chosen on validation: ``threshold``, ``min_lesion_size`` and ``core_threshold``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    roi = config.validation.roi_size
    return ModelCheckpoint(
        state_dict=state, network=net_config, normalization=config.normalization, threshold=float(threshold),
        min_lesion_size=float(min_lesion_size),
        core_threshold=None if core_threshold is None else float(core_threshold),
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
        "best_min_lesion_size": state.best_min_lesion_size, "best_core_threshold": state.best_core_threshold,
        "history": state.history, "rng": rng_state(),
    }
    checkpoint.save(out_dir / "last.pt")


METRIC_COLUMNS = ("epoch", "train_loss", "train_predicted_to_lesion", "train_predicted_fraction", "val_score", "val_dice",
                  "val_lesion_f1", "val_lesion_ppv", "val_threshold", "val_min_lesion_size", "val_core_threshold", "lr", "seconds",
                  "voxels_per_second")


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
    if data_module.uses_grey_matter(config):
        maps = data_module.grey_matter_of(train_cases)
        missing = sorted(case_id for case_id, path in maps.items() if path is None)
        record.update(grey_matter_weight=config.data.hard_negative.grey_matter_weight,
                      grey_matter_maps=len(maps) - len(missing), without_grey_matter=missing)
        if missing:
            log.warning("hard negatives: %d of %d training case(s) have no grey-matter map (planar3d synth writes "
                        "grey_matter/ for phantoms and hosts fitted to mni152); their brain mask alone weights "
                        "them: %s", len(missing), len(maps), ", ".join(missing))
        else:
            log.info("hard negatives: grey matter weighted %gx more in every training case (%d)",
                     config.data.hard_negative.grey_matter_weight, len(maps))
    return record


def write_run_json(out_dir: Path, name: str, config: TrainConfig, info: dict, extra: dict) -> None:
    from planar3d.provenance import git_state, machine_info

    # a validation Dice of an epoch without lesions is legitimately undefined: null, never NaN
    write_json(out_dir / name, json_safe({
        "seed": config.seed, "config": config.to_dict(), "versions": info["versions"],
        "git": git_state(), "machine": machine_info(), **extra,
    }))


# --- the case split ---------------------------------------------------------------------------


@dataclass
class CaseSplit:
    """The fold's cases by role, and what the split warns about."""

    manifest: object  # planar3d.data.manifest.Manifest
    train: list
    validation: list
    set_aside: list = field(default_factory=list)  # other cases of held-out validation hosts
    warning: Optional[str] = None  # planar3d.data.hosts.shared_host_warning
    validation_loads: Dict[str, float] = field(default_factory=dict)  # lesion over brain voxels, when measured

    def record(self) -> dict:
        """The split as recorded in ``run.json``."""
        return {"train": len(self.train), "validation": [c.id for c in self.validation],
                "set_aside": [c.id for c in self.set_aside], "hold_out_hosts_warning": self.warning,
                "validation_lesion_loads": self.validation_loads}


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
    loads: Dict[str, float] = {}
    if config.validation.hold_out_hosts:
        def load_of(case) -> float:
            from planar3d.data.synth import case_lesion_load

            if case.id not in loads:
                loads[case.id] = case_lesion_load(case.image, case.label)
            return loads[case.id]

        load_rule = load_of if config.validation.spread_over_load else None
        train_cases, val_cases, aside = data_module.split_validation_by_host(cases, config.val_cases, config.seed,
                                                                             load_of=load_rule)
    else:
        (train_cases, val_cases), aside = data_module.split_validation(cases, config.val_cases, config.seed), []
    warning = shared_host_warning(train_cases, val_cases)
    if warning:
        log.warning("%s", warning)
    if aside:
        log.info("validation holds out whole hosts: %d case(s) of those hosts set aside (%s)", len(aside),
                 ", ".join(c.id for c in aside))
    if loads:
        log.info("validation cases by lesion load: %s",
                 ", ".join(f"{c.id} {100 * loads[c.id]:.2f} %" for c in val_cases if c.id in loads))
    return CaseSplit(manifest, train_cases, val_cases, aside, warning,
                     {c.id: loads[c.id] for c in val_cases if c.id in loads})
