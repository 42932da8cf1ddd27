"""Inference of a network over one preprocessed volume: whole-volume passes, slabs, or windows.

Shared by validation during training and by ``planar3d predict`` so both compute the same
thing. Three ways to cover a scan, chosen by ``roi_size``:

* **whole volume** (``roi_size`` ``None`` or ``-1`` on every axis, the prediction default): one
  forward pass over the scan when its estimated memory (:func:`estimated_forward_bytes`) fits the
  budget (:func:`memory_budget_bytes`). That is the least work: no overlap, no blending.
* **slabs** (the same setting when the whole volume does not fit): whole planes, cut along one
  axis only (``slab_axis``, by default the network's plane axis), each slab extended by
  ``margin`` planes on each inner side that are computed and thrown away (no blending).
  Slab starts are aligned to the network's pooling multiple along that axis, so every kept plane
  sees the same pooling grid as in the whole-volume pass; with a margin of
  :data:`EXACT_MARGIN_PLANES` (the receptive field of the published network along its plane
  axis, 45 planes, rounded up to the pooling multiple) the slabs give the whole-volume result to
  float rounding. The default margin is smaller (:data:`DEFAULT_MARGIN_PLANES`), the difference
  measured in ``docs/prediction.md``.
* **windows** (any axis of ``roi_size`` smaller than the scan): MONAI
  ``sliding_window_inference`` with Gaussian blending and ``overlap``, as before.

Layout and precision: :func:`prepare_for_inference` puts the model in ``channels_last_3d`` on both
devices (oneDNN on the CPU and cuDNN on CUDA avoid layout reorders around every conv: the
whole-head pass on 2 CPU cores went from 49 s to 36 s). Precision (:func:`resolve_precision`):
by default bf16 autocast on CUDA and fp32 on the CPU, so a CPU's mask does not depend on whether
that CPU has bf16 units; ``precision="bf16"`` opts in on the CPU (on this project's AVX512-BF16 CPU
the network ran 1.9x faster; on CPUs without bf16 units it is slower; docs/prediction.md).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from planar3d.host_memory import free_heap_bytes

#: Planes computed and discarded on each inner side of a slab when nothing else is asked for.
DEFAULT_MARGIN_PLANES = 16
#: A margin that makes slabs equal the whole-volume pass (to rounding) for the published network:
#: output planes depend on at most 45 input planes on either side along the plane axis
#: (``tests/test_inference.py`` checks this), rounded up to the pooling multiple of 16.
EXACT_MARGIN_PLANES = 48
#: Peak activation memory of one forward pass per (padded) voxel at width 1.0, fp32, measured on
#: the CPU (176x240x160: 9.9 GiB peak RSS with 0.6 GiB of it torch and the weights); it scales
#: with the width and with the activation dtype's size.
FORWARD_BYTES_PER_VOXEL = 1500
#: Share of the free memory a forward pass may plan to use (the rest: other processes, the
#: reader and writer threads, fragmentation).
MEMORY_FRACTION = 0.6


def autocast_context(device: torch.device, enabled: bool = True):
    """Training's precision: bf16 autocast on CUDA; fp32 on the CPU (the module docstring says why)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: Inference precisions: ``auto`` (bf16 on CUDA, fp32 on the CPU), ``fp32``, ``bf16`` (autocast).
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"``: ``auto`` is bf16 on CUDA and fp32 on the CPU.

    bf16 on the CPU is an opt-in: on a CPU with bf16 units (AVX512-BF16 or AMX) a whole-network
    pass ran 1.9x faster here, but probabilities move by about 1e-3 and a CPU without those units
    runs it slower than fp32, so the default keeps a CPU's mask independent of the CPU model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether the CPU has bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` flags); None when unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return None
    return None


def precision_context(device: torch.device | str, precision: str):
    """Inference's precision (a resolved ``"fp32"``/``"bf16"``): bf16 autocast on the device, or nothing."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CUDA use the channels_last_3d layout (about 2x faster convs).

    Training uses this; prediction uses :func:`prepare_for_inference`.
    """
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def prepare_for_inference(
    model: nn.Module, device: torch.device | str, compile_model: bool = False, cudnn_benchmark: bool = False
) -> nn.Module:
    """The model ready for :func:`predict_probabilities`: on ``device``, ``eval()``, channels_last_3d.

    Args:
        compile_model: wrap in ``torch.compile`` (``dynamic=True``: scan shapes vary). Off by
            default: on the CPU the first call compiled for minutes for a 10 % gain at most
            (benchmarks/README.md); on CUDA it is measured by ``benchmarks/gpu_check.py``.
        cudnn_benchmark: let cuDNN time its algorithms per input shape. Off by default because
            every scan has its own shape, so each new scan would pay the search again;
            ``benchmarks/gpu_check.py`` measures both.
    """
    device = torch.device(device)
    model = model.to(device).eval().to(memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    if compile_model:
        model = torch.compile(model, dynamic=True)  # type: ignore[assignment]
    return model


# --- planning ------------------------------------------------------------------------------------


def _network_config(model: nn.Module):
    """The :class:`PlanarResUNetConfig` of ``model`` (also through ``torch.compile``), else None."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "config", None)


def size_multiple(model: nn.Module) -> Tuple[int, int, int]:
    """Per axis, the multiple the network pads its input to (1 for networks that do not say)."""
    config = _network_config(model)
    if config is not None and hasattr(config, "size_multiple"):
        return tuple(int(m) for m in config.size_multiple())  # type: ignore[return-value]
    return (1, 1, 1)


def uses_instance_norm(model: nn.Module) -> bool:
    """Whether ``model`` normalises with instance statistics: then a slab's probabilities depend
    on the rest of the volume, and slabs differ from one whole pass (on patient26 at full width,
    trained: by up to 0.58 in probability, 882 of 2156 lesion voxels flipped)."""
    return any(isinstance(module, nn.modules.instancenorm._InstanceNorm) for module in model.modules())


def estimated_forward_bytes(model: nn.Module, shape: Sequence[int], device: torch.device | str) -> int:
    """Peak activation memory of one forward pass over ``shape`` (the padded size counts).

    From :data:`FORWARD_BYTES_PER_VOXEL` scaled by the network's width (1.0 for other networks)
    and halved under bf16 autocast on CUDA.
    """
    config = _network_config(model)
    width = float(getattr(config, "width", 1.0)) if config is not None else 1.0
    padded = [s + (-s) % m for s, m in zip(shape, size_multiple(model))]
    per_voxel = FORWARD_BYTES_PER_VOXEL * max(width, 1 / 64) * (0.5 if torch.device(device).type == "cuda" else 1.0)
    return int(math.prod(padded) * per_voxel)


def memory_budget_bytes(device: torch.device | str) -> int:
    """What one forward pass may use: :data:`MEMORY_FRACTION` of the free memory of ``device``.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (else 4 GiB) plus the free memory the process keeps
    for reuse (:func:`planar3d.host_memory.free_heap_bytes`); CUDA: ``torch.cuda.mem_get_info``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int((int(line.split()[1]) * 1024 + free_heap_bytes()) * MEMORY_FRACTION)
    except OSError:
        pass
    return 4 * 2**30


@dataclass(frozen=True)
class Slab:
    """One forward pass along the slab axis: compute planes ``[start, stop)``, keep ``[keep_start, keep_stop)``."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def plan_slabs(length: int, max_planes: int, margin: int, align: int = 1) -> List[Slab]:
    """Slabs covering ``length`` planes, each at most ``max_planes`` thick including margins.

    The kept parts tile ``[0, length)``; every slab starts at a multiple of ``align`` and extends
    ``margin`` planes (rounded up to ``align``) past its kept part on each inner side; the kept
    parts are balanced in size (multiples of ``align``). One slab when the whole length fits.

    Example:
        >>> [(s.start, s.stop, s.keep_start, s.keep_stop) for s in plan_slabs(160, 112, 16, 16)]
        [(0, 96, 0, 80), (64, 160, 80, 160)]
    """
    if length <= max_planes:
        return [Slab(0, length, 0, length)]
    align = max(int(align), 1)
    margin = -(-int(margin) // align) * align
    for count in range(2, length + 1):
        core = -(-(-(-length // count)) // align) * align  # balanced, rounded up to the alignment
        slabs = []
        for keep_start in range(0, length, core):
            keep_stop = min(keep_start + core, length)
            slabs.append(Slab(max(0, keep_start - margin), min(length, keep_stop + margin), keep_start, keep_stop))
        if max(s.stop - s.start for s in slabs) <= max_planes:
            break
        if core == align:
            raise ValueError(f"slabs of {max_planes} planes leave no room next to margins of {margin} planes")
    return slabs


def _fitting_slabs(length: int, max_planes: int, margin: int, align: int) -> List[Slab]:
    """:func:`plan_slabs`, halving the margin when the budget leaves it no room; at worst slabs
    of ``align`` planes without margins (over budget, but the least memory possible)."""
    while True:
        try:
            return plan_slabs(length, max(max_planes, 1), margin, align)
        except ValueError:
            if margin <= 0:
                return plan_slabs(length, max(align, 1), 0, align)
            margin //= 2


def _slab_axis(model: nn.Module, slab_axis: Optional[int], shape: Sequence[int]) -> int:
    if slab_axis is not None:
        return int(slab_axis)
    config = _network_config(model)
    if config is not None and hasattr(config, "plane_axis"):
        return int(config.plane_axis)
    return int(np.argmax(shape))


def warm_up(model: nn.Module, device: torch.device | str, in_channels: int = 1, precision: str = "auto") -> None:
    """One small forward pass on CUDA, so the first scan does not pay the one-time start-up
    (cuDNN handles, lazy initialisation, compilation under ``torch.compile``). Nothing on the
    CPU: oneDNN prepares its kernels per input shape, so a small pass would not help a scan."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    shape = [2 * m for m in size_multiple(model)]
    x = torch.zeros(1, in_channels, *shape, device=device).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), precision_context(device, resolve_precision(precision, device)):
        model(x)
    torch.cuda.synchronize(device)


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 5D weights are in channels_last_3d (:func:`prepare_for_inference`)."""
    for parameter in model.parameters():
        if parameter.dim() == 5 and parameter.shape[1] > 1:
            return parameter.is_contiguous(memory_format=torch.channels_last_3d) and not parameter.is_contiguous()
    return False


def inference_window(roi_size: Optional[Sequence[int]], plane_axis: int) -> Optional[Tuple[int, int, int]]:
    """The window a stored ``roi_size`` is run with: ``None`` (the whole volume) or ``roi_size``.

    Slabs of whole planes (``-1`` on every axis but ``plane_axis``) become the whole-volume
    pass, cut into slabs only when memory requires (:func:`predict_probabilities`): the least
    work. Validation during training and ``planar3d predict`` both go through this, so the
    threshold chosen on validation is chosen on the probabilities ``predict`` produces: with
    instance norm, a 32-plane slab's probabilities differ from the whole volume's (issue 9).
    """
    if roi_size is None or all(int(r) < 0 for axis, r in enumerate(roi_size) if axis != int(plane_axis)):
        return None
    return tuple(int(r) for r in roi_size)  # type: ignore[return-value]


def _window(roi_size: Optional[Sequence[int]], shape: Sequence[int]) -> list:
    if roi_size is None:
        return list(shape)
    return [int(s) if int(r) <= 0 else min(int(r), int(s)) for r, s in zip(roi_size, shape)]


# --- running -------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    volume: np.ndarray,
    roi_size: Optional[Sequence[int]] = None,
    overlap: float | Sequence[float] = 0.25,
    sw_batch_size: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    flip_axes: Sequence[int] = (),
    in_channels: int = 1,
    slab_axis: Optional[int] = None,
    margin: int = DEFAULT_MARGIN_PLANES,
    memory_budget: Optional[int] = None,
    progress: bool = False,
    passes: Optional[Dict[str, Any]] = None,
) -> np.ndarray:
    """Lesion probability (sigmoid of the logits) for every voxel of ``volume``.

    Args:
        model: network returning logits of shape (N, 1, *spatial).
        volume: preprocessed 3D array (already reoriented and normalised).
        roi_size: window size per axis; ``-1`` or ``None`` = whole axis. Whole on every axis:
            one pass, or slabs when it does not fit ``memory_budget`` (module docstring).
        overlap: window overlap fraction (one value or one per axis), windows only.
        sw_batch_size: windows run together in one batch, windows only.
        device: where the model runs.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on the CPU), ``fp32`` or ``bf16``
            (:func:`resolve_precision`).
        flip_axes: spatial axes to flip for test-time augmentation; the prediction is the
            mean of the plain pass and one pass per flipped axis (each flipped back).
        in_channels: 3 repeats the grey volume into 3 channels (the published setting).
        slab_axis: axis cut into slabs (default: the network's plane axis).
        margin: planes computed and discarded on each inner side of a slab
            (:data:`EXACT_MARGIN_PLANES` for the whole-volume result to rounding).
        memory_budget: bytes one pass may use (default :func:`memory_budget_bytes`).
        progress: a tqdm bar (stderr) over the windows or slabs of a pass that has several, so
            a long scan shows it is moving.
        passes: a dict that, when given, receives how the model ran: ``{"mode": "whole"}``,
            ``{"mode": "slabs", "slabs": n}`` (memory did not allow one pass) or
            ``{"mode": "windows"}``, and with slabs under instance norm ``"warning"``: the
            probabilities then differ from the whole pass's (:func:`uses_instance_norm`).

    Returns:
        float32 array of ``volume``'s shape.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    shape = tuple(int(s) for s in volume.shape)
    window = _window(roi_size, shape)
    image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if in_channels > 1:
        image = image.expand(-1, in_channels, -1, -1, -1)
    memory_format = torch.channels_last_3d if device.type == "cuda" or _is_channels_last(model) else torch.contiguous_format
    image = image.to(device).contiguous(memory_format=memory_format)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with precision_context(device, precision):
            return model(batch.contiguous(memory_format=memory_format)).float()

    if window != list(shape):
        if passes is not None:
            passes["mode"] = "windows"

        def one_pass(x: torch.Tensor) -> torch.Tensor:
            from monai.inferers import sliding_window_inference

            return torch.sigmoid(sliding_window_inference(
                x, window, sw_batch_size, run, overlap=overlap, mode="gaussian", padding_mode="constant",
                progress=progress,
            ))[0, 0]
    else:
        axis = _slab_axis(model, slab_axis, shape)
        budget = memory_budget_bytes(device) if memory_budget is None else int(memory_budget)
        per_plane = max(estimated_forward_bytes(model, shape, device) // max(shape[axis], 1), 1)
        slabs = _fitting_slabs(shape[axis], budget // per_plane, margin, size_multiple(model)[axis])
        if passes is not None:
            passes.update({"mode": "whole"} if len(slabs) == 1 else {"mode": "slabs", "slabs": len(slabs)})
            if len(slabs) > 1 and uses_instance_norm(model):
                passes["warning"] = (
                    f"ran in {len(slabs)} slabs for lack of memory ({budget / 2 ** 30:.1f} GiB for a pass that needs "
                    f"about {estimated_forward_bytes(model, shape, device) / 2 ** 30:.1f} GiB): with instance norm the "
                    f"probabilities differ from the whole-volume pass that validation chose the threshold on; "
                    f"predict with more free memory or on a GPU for the same mask")

        def one_pass(x: torch.Tensor) -> torch.Tensor:
            from tqdm import tqdm

            probability = torch.empty(shape, dtype=torch.float32, device=device)
            for slab in tqdm(slabs, desc="slabs", unit="slab", leave=False, disable=not progress or len(slabs) < 2):
                logits = run(x.narrow(2 + axis, slab.start, slab.stop - slab.start))[0, 0]
                kept = logits.narrow(axis, slab.keep_start - slab.start, slab.keep_stop - slab.keep_start)
                torch.sigmoid(kept, out=probability.narrow(axis, slab.keep_start, slab.keep_stop - slab.keep_start))
                del logits, kept
            return probability

    probability = one_pass(image)
    for flip_axis in flip_axes:
        dims = [2 + int(flip_axis)]
        probability += torch.flip(one_pass(torch.flip(image, dims)), [int(flip_axis)])
    if flip_axes:
        probability /= 1 + len(flip_axes)
    return probability.cpu().numpy()
