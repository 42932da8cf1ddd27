"""The training process's set-up: what each rank does around the model, not to it.

- :class:`Dist` and :func:`setup_distributed`: the process group under ``torchrun`` (DDP: nccl on
  CUDA, gloo on the CPU); :func:`wrap_model` (the DDP wrapper) and :func:`_unwrap` (the bare model);
- :func:`choose_device`, :func:`set_determinism` (seeds, deterministic kernels) and
  :func:`setup_logging`: the ``planar3d.train`` logger :data:`log` (stderr and, on rank 0,
  ``train.log``), through which every training module logs;
- :func:`rng_state` / :func:`set_rng_state`: every RNG's state as ``weights_only``-loadable values,
  for ``last.pt`` and an exact resume.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from planar3d.errors import ConfigError

log = logging.getLogger("planar3d.train")

# --- process group, device, seeds, logging -------------------------------------------------------


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
    console = [h for h in log.handlers if getattr(h, "_planar3d", False)]
    if not console:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._planar3d = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    else:
        # the stderr of this run: a second run in one process (a test runner, a notebook) may
        # have replaced sys.stderr, and the first run's may be closed (so not setStream, which
        # flushes the old stream first)
        console[0].stream = sys.stderr
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            handler.close()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(out_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)


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


# --- the model as trained: DDP-wrapped or bare -----------------------------------------------


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
