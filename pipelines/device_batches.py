"""Training batches cut and augmented where the network runs (``data.loader: device``).

Why: on a GPU the MONAI loader (``data.loader: monai``: CPU transforms in DataLoader workers)
could not keep up with the training step (issue 10: 1.5-2e7 voxels/s, GPU busy < 60 % on an
H100, where a 16x256x256 slab forward + backward takes 16 ms). Here every preprocessed training
volume is loaded once and kept as a tensor -- on the GPU when it fits in half of its free memory,
else in pinned host memory -- and each step's patches are cut with slicing, then flipped,
deformed (``affine_grid``/``grid_sample``), gamma-adjusted, bias-field-multiplied, noised and
(with ``augmentation.scanner``) thick-sliced, blurred and histogram-shifted as batched or
per-sample tensor operations on the training device (:mod:`planar3d.patches`). No worker processes,
no per-sample CPU transform; on the CPU it is the same code with ``device=cpu``.

Samples (same distributions as the MONAI chain of :mod:`pipelines.data`, not the same numbers):

* ``lesion``: a patch is centred on a uniformly drawn lesion voxel with probability
  ``pos_neg_ratio / (pos_neg_ratio + 1)``, else on a uniformly drawn background voxel
  (``RandCropByPosNegLabeld(pos=pos_neg_ratio, neg=1)``; a volume without lesion gives background
  centres only); volumes are edge-padded to at least the patch size first, and a centre near the
  border moves the least needed for the patch to fit (MONAI's rule).
* ``lesion_hard_negative`` (:class:`planar3d.sampling.RandCropByLesionHardNegatived`'s
  distribution): the kind (lesion, hard_negative, random) drawn with ``data.ratios``; the centre a
  uniform lesion voxel, a hard-negative candidate (uniform, or by the prior's cumulative weights)
  or a uniform position of the padded volume. The candidates are computed once per volume when
  the loader is built, by the MONAI chain's own transform
  (:func:`pipelines.data.centre_indices_transform`: ``PatchCentreIndicesd`` on the edge-padded
  volume, the brain mask -- or ones for a case without one -- zero-padded as ``SpatialPadd``
  pads it). A kind without candidates gives a random patch instead, counted per epoch
  (:attr:`DevicePatchLoader.kind_counts`, :attr:`DevicePatchLoader.fallback_counts`, logged).
* ``slabs``: ``slab_planes`` planes over the whole in-plane extent (volumes edge-padded to the
  largest training scan), at a uniform position.
* Other sampling modes are refused (:class:`planar3d.errors.ConfigError`), never silently replaced.

Augmentation, in MONAI's order and with its parameter distributions: in-plane flips (each axis
with ``flip_prob``), in-plane rotation ``U(-rotate_degrees, rotate_degrees)`` and scale
``1 + U(-scale, scale)`` per in-plane axis with ``affine_prob`` (image trilinear, label nearest,
border padding), gamma ``U(gamma_range)`` keeping mean and std, bias field (degree 3, coefficients
``U(0, bias_field_coeff)``), Gaussian noise of std ``U(0, noise_std)``; then, with
``augmentation.scanner``, :func:`planar3d.augment.scanner_augmentation`'s transforms on the image:
thick slices (:func:`planar3d.augment.simulate_thick_slices` along the plane axis or a drawn one,
factor ``U(thick_slice_factor)`` capped by the volume's spacing with
:func:`planar3d.augment.capped_thickness_factor`), Gaussian blur (sigma ``U(blur_sigma)`` per axis,
MONAI's kernels), bias field, histogram shift (``U{control points}``, MONAI's control-point rule,
non-finite results replaced by the input), gamma, noise -- each with its own probability.

Randomness: an epoch's volume order is drawn from ``(seed, epoch)`` (shared by all ranks, then
sharded like ``DistributedSampler``), and step ``s``'s choices from a generator seeded with
``(seed, epoch, rank, s)``: kinds, centres and augmentation parameters on the CPU (the scanner
parameters as a second block of rows, so the sampling stream does not depend on them), the noise
fields on the training device. So any batch is a pure function of those four numbers: a resumed
run draws exactly what an uninterrupted one would have, on the CPU bit for bit (on a GPU, the
noise comes from the device's generator: repeatable there, different from the CPU's numbers).
The host never waits for the GPU: parameters travel in one small pinned, non-blocking copy.

Example:
    >>> # loader = DevicePatchLoader.from_cases(config, cases, plane_axis=2, device=torch.device("cuda"))
    >>> # for image, label in loader.epoch_batches(epoch): ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from planar3d import patches as P
from planar3d.augment import capped_thickness_factor, simulate_thick_slices
from planar3d.errors import ConfigError
from planar3d.sampling import KINDS

from pipelines.config import TrainConfig

log = logging.getLogger("planar3d.train")

DEVICE_SAMPLING = ("lesion", "slabs", "lesion_hard_negative")
#: Share of the GPU's free memory the cached volumes may take before they are kept in pinned host memory.
DEVICE_MEMORY_SHARE = 0.5
_CACHE_FORMAT = "planar3d-device-cache/3"

# columns of the per-patch uniform draws (one row per patch, the same layout for every step)
_KIND, _CENTRE, _START = 0, 1, 2            # _START.._START+2: slab start per axis
_FLIP = 5                                   # two in-plane axes
_AFFINE, _ANGLE, _SCALE = 7, 8, 9           # _SCALE, _SCALE+1: two in-plane axes
_GAMMA, _GAMMA_VALUE = 11, 12
_BIAS, _BIAS_COEFFS = 13, 14                # 20 coefficients
_NOISE, _NOISE_STD = 14 + len(P.bias_field_terms()), 15 + len(P.bias_field_terms())
_DRAWS = _NOISE_STD + 1

# columns of the scanner-augmentation draws (a second block of rows, drawn after the first)
_THICK, _THICK_AXIS, _THICK_FACTOR = 0, 1, 2
_BLUR, _BLUR_SIGMA = 3, 4                   # three axes
_SBIAS, _SBIAS_COEFFS = 7, 8                # 20 coefficients
_HIST, _HIST_COUNT = 8 + len(P.bias_field_terms()), 9 + len(P.bias_field_terms())
_SGAMMA, _SGAMMA_VALUE = _HIST_COUNT + 1, _HIST_COUNT + 2
_SNOISE, _SNOISE_STD = _HIST_COUNT + 3, _HIST_COUNT + 4
_HIST_POINTS = _SNOISE_STD + 1              # up to (most control points - 2) interior points


def step_seed(*values: int) -> int:
    """A 63-bit seed mixing ``values`` (e.g. seed, epoch, rank, step) with numpy's ``SeedSequence``."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def check_device_loader_config(config: TrainConfig) -> None:
    """Refuse configurations the device loader does not implement, naming them."""
    if config.data.sampling not in DEVICE_SAMPLING:
        raise ConfigError(f"data.loader=device with data.sampling={config.data.sampling}: the device loader "
                          f"samples only {', '.join(DEVICE_SAMPLING)}; use data.loader=monai for this sampling")


@dataclass
class LoadedVolume:
    """One preprocessed training case as :func:`load_volume` returns it (CPU tensors)."""

    image: torch.Tensor                     # (1, X, Y, Z) float32
    label: torch.Tensor                     # (1, X, Y, Z) uint8
    spacing: Tuple[float, float, float]     # RAS voxel spacing, mm (caps simulated slice thickness)
    prior: Optional[torch.Tensor] = None    # (1, X, Y, Z) float32 brain mask (hard-negative weights), if asked


def cache_key(image: Path, label: Path, normalization, sidecars: Optional[Dict[str, str]] = None,
              grey_matter_weight: float = 0.0) -> str:
    """Name of a case's persistent cache file: changes with any of its files, the normalisation
    or the prior's grey-matter weight."""
    sidecars = dict(sidecars or {})
    parts = {"format": _CACHE_FORMAT, "normalization": normalization.to_dict(), "sidecars": sidecars,
             "grey_matter_weight": grey_matter_weight}
    named = [("image", image), ("label", label)] + [(f"{key}_file", path) for key, path in sorted(sidecars.items()) if path]
    for name, path in named:
        stat = Path(path).stat()
        parts[name] = [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, allow_nan=False).encode()).hexdigest()[:32]


def load_volume(case, normalization, cache_dir: Optional[Path], sidecars: Optional[Dict[str, str]] = None,
                grey_matter_weight: float = 0.0) -> LoadedVolume:
    """A case preprocessed as the MONAI loader does (:class:`pipelines.data.LoadPreprocessd`, so
    exactly as prediction does); ``sidecars``: ``None`` or ``{}`` (no prior wanted), else the
    case's entry of :func:`pipelines.data.prior_sidecars` (``"brain_mask": ""``: wanted, the case
    has none: uniform weights, as the MONAI loader gives). Read from / written to ``cache_dir`` if
    given."""
    from pipelines.data import LoadPreprocessd

    path = None
    if cache_dir is not None:
        path = cache_dir / f"{cache_key(case.image, case.label, normalization, sidecars, grey_matter_weight)}.pt"
        if path.is_file():
            stored = torch.load(path, weights_only=True)
            return LoadedVolume(stored["image"], stored["label"], tuple(stored["spacing"].tolist()), stored.get("prior"))
    item = {"image": str(case.image), "label": str(case.label), **(sidecars or {})}
    loaded = LoadPreprocessd(normalization=normalization, grey_matter_weight=grey_matter_weight)(item)
    image = loaded["image"].contiguous()
    label = (loaded["label"] > 0).to(torch.uint8).contiguous()
    prior = torch.as_tensor(loaded["brain_mask"], dtype=torch.float32) if "brain_mask" in loaded else None
    volume = LoadedVolume(image, label, tuple(float(v) for v in loaded["spacing"]), prior)
    if path is not None:
        from planar3d.io import atomic_write

        cache_dir.mkdir(parents=True, exist_ok=True)
        stored = {"image": image, "label": label, "spacing": torch.tensor(volume.spacing, dtype=torch.float64)}
        if prior is not None:
            stored["prior"] = prior
        with atomic_write(path, "wb") as stream:
            torch.save(stored, stream)
    return volume


@dataclass
class PatchChoice:
    """Where one patch of a step came from (``lesion_hard_negative``: its kind and any fallback)."""

    volume: int
    kind: str                   # lesion, hard_negative, random (lesion/slabs modes: lesion, background, slab)
    requested: str              # the kind drawn
    fallback: str               # why ``kind`` differs from ``requested`` ("" when it does not)
    voxel: Tuple[int, int, int]  # the drawn centre voxel (padded volume), or the slab start
    start: Tuple[int, int, int]


@dataclass
class _Volume:
    image: torch.Tensor            # (1, X, Y, Z) float32, padded, on the storage device
    label: torch.Tensor            # (1, X, Y, Z) uint8, same
    lesions: torch.Tensor          # sorted flat indices of lesion voxels (CPU int64)
    ranks: torch.Tensor            # planar3d.patches.background_ranks(lesions)
    spacing: Optional[Tuple[float, float, float]] = None
    hard_negatives: Optional[np.ndarray] = None   # PatchCentreIndicesd's candidates (padded volume)
    cumweights: Optional[np.ndarray] = None       # their cumulative prior weights, or None (unweighted)


class DevicePatchLoader:
    """Training batches from volumes held once as tensors (module docstring).

    Args:
        volumes: ``(image, label)`` per training case, channel-first ``(1, X, Y, Z)`` (preprocessed,
            RAS), on the CPU.
        config: the training config (``data`` and ``augmentation`` sections are used).
        plane_axis: the network's plane axis (flips, rotation, slabs and thick slices are about it).
        device: the training device; batches come out there.
        storage: ``auto`` (the device when the volumes take at most half its free memory, else
            pinned host memory), ``device`` or ``host``.
        spacings: RAS voxel spacing (mm) per volume: caps the simulated slice thickness as the
            MONAI loader's ``spacing`` key does; ``None``: no cap.
        priors: ``(1, X, Y, Z)`` hard-negative weights per volume (the brain mask) or ``None``
            entries; used when ``data.hard_negative.prior`` asks for them, where a missing one
            weighs every voxel 1, as the MONAI loader does.
    """

    def __init__(self, volumes: Sequence[Tuple[torch.Tensor, torch.Tensor]], config: TrainConfig, plane_axis: int,
                 device: torch.device, storage: str = "auto",
                 spacings: Optional[Sequence[Optional[Tuple[float, float, float]]]] = None,
                 priors: Optional[Sequence[Optional[torch.Tensor]]] = None):
        check_device_loader_config(config)
        if not volumes:
            raise ConfigError("data.loader=device: no training volume")
        self.config, self.plane_axis, self.device = config, int(plane_axis), torch.device(device)
        self.in_plane = [a for a in range(3) if a != self.plane_axis]
        data = config.data
        shapes = [tuple(image.shape[1:]) for image, _ in volumes]
        if data.sampling == "slabs":
            size = [max(s[a] for s in shapes) for a in range(3)]
            size[self.plane_axis] = data.slab_planes
        else:
            size = [max(s[a] for s in shapes) if int(v) < 0 else int(v) for a, v in enumerate(data.patch_size)]
        self.patch_size = tuple(size)
        self.pos_fraction = data.pos_neg_ratio / (data.pos_neg_ratio + 1.0)
        ratios = np.asarray(data.ratios, dtype=np.float64)
        self.kind_bounds = np.cumsum(ratios / ratios.sum())[:2].tolist()  # lesion below [0], hard negative below [1]
        spacings = list(spacings) if spacings is not None else [None] * len(volumes)
        priors = list(priors) if priors is not None else [None] * len(volumes)
        padded = [(P.pad_symmetric(image, size), P.pad_symmetric(label, size)) for image, label in volumes]
        self.storage = self._choose_storage(storage, padded)
        self.volumes: List[_Volume] = []
        for (image, label), (original, _), spacing, prior in zip(padded, volumes, spacings, priors):
            lesions = torch.nonzero(label[0].reshape(-1)).reshape(-1).to(torch.int64)
            hard_negatives, cumweights = None, None
            if data.sampling == "lesion_hard_negative":
                hard_negatives, cumweights = self._candidates(image, label, original, prior)
            image, label = image.contiguous(), label.contiguous()
            if self.storage == "device":
                image, label = image.to(self.device), label.to(self.device)
            elif self.device.type == "cuda":
                image, label = image.pin_memory(), label.pin_memory()
            self.volumes.append(_Volume(image, label, lesions, P.background_ranks(lesions),
                                        tuple(float(v) for v in spacing) if spacing is not None else None,
                                        hard_negatives, cumweights))
        self.noise_generator = torch.Generator(device=self.device)
        self._legendre: Optional[Tuple[torch.Tensor, ...]] = None  # bias-field bases of the patch shape
        self.kind_counts: Counter = Counter()       # this epoch's patches by kind (lesion_hard_negative)
        self.fallback_counts: Counter = Counter()   # this epoch's fallbacks to a random patch, by (requested, reason)
        self.last_choices: List[PatchChoice] = []   # the last batch's patches
        log.info("device loader: %d volumes (%.0f MB) kept on %s, patches %s made on %s", len(self.volumes),
                 sum(v.image.numel() * 5 for v in self.volumes) / 1e6,
                 self.device if self.storage == "device" else "the host (pinned)" if self.device.type == "cuda" else "the host",
                 "x".join(map(str, self.patch_size)), self.device)

    def _candidates(self, image: torch.Tensor, label: torch.Tensor, original: torch.Tensor,
                    prior: Optional[torch.Tensor]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Hard-negative centres of one padded volume, by the MONAI loader's own transform
        (:func:`pipelines.data.centre_indices_transform`) on the same padded arrays: the prior (or
        ones, for a case without one) zero-padded as its ``SpatialPadd(mode="constant")`` does."""
        from pipelines.data import centre_indices_transform

        transform = centre_indices_transform(self.config)
        item = {"image": image, "label": label}
        if transform.prior_key is not None:
            weights = prior if prior is not None else torch.ones_like(original, dtype=torch.float32)
            item[transform.prior_key] = P.pad_symmetric(weights.float(), self.patch_size, mode="constant")
        out = transform(item)
        return out[transform.prefix + "hard_negative_indices"], out.get(transform.prefix + "hard_negative_cumweights")

    def _choose_storage(self, storage: str, padded) -> str:
        if storage not in ("auto", "device", "host"):
            raise ConfigError(f"device loader storage {storage!r}: expected auto, device or host")
        if storage != "auto":
            return storage
        if self.device.type != "cuda":
            return "device"  # the host is the device
        needed = sum(image.numel() * 5 for image, _ in padded)  # float32 image + uint8 label
        free, _ = torch.cuda.mem_get_info(self.device)
        return "device" if needed <= DEVICE_MEMORY_SHARE * free else "host"

    @classmethod
    def from_cases(cls, config: TrainConfig, cases, plane_axis: int, device: torch.device,
                   run_dir: Optional[Path] = None, storage: str = "auto") -> "DevicePatchLoader":
        """Load ``cases`` once (threads: gzip decoding releases the GIL) and build the loader.

        ``data.cache: disk`` keeps the preprocessed tensors in ``run_dir/cache/device`` for later
        runs; ``memory`` and ``none`` load them from the NIfTI files (the volumes are held in
        memory either way: sampling on the device needs them there). With a brain-mask prior
        (:func:`pipelines.data.prior_sidecars`) each case's sidecars are read with it.
        """
        from pipelines.data import prior_sidecars

        check_device_loader_config(config)
        cache_dir = Path(run_dir) / "cache" / "device" if config.data.cache == "disk" and run_dir is not None else None
        sidecars = prior_sidecars(config, cases)
        weight = config.data.hard_negative.grey_matter_weight

        def load(case) -> LoadedVolume:
            return load_volume(case, config.normalization, cache_dir, sidecars.get(case.id), weight)

        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(cases)))) as pool:
            loaded = list(pool.map(load, cases))
        return cls([(v.image, v.label) for v in loaded], config, plane_axis, device, storage,
                   spacings=[v.spacing for v in loaded], priors=[v.prior for v in loaded])

    # --- the epoch's plan ---------------------------------------------------------------------

    def epoch_volumes(self, epoch: int, rank: int = 0, world_size: int = 1) -> List[int]:
        """This rank's volumes in this epoch's order: a permutation drawn from ``(seed, epoch)``,
        padded to a multiple of ``world_size`` and sharded as ``DistributedSampler`` does."""
        count = len(self.volumes)
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, epoch))
        order = torch.randperm(count, generator=generator).tolist()
        if world_size > 1:
            total = -(-count // world_size) * world_size
            order = (order * (-(-total // count)))[:total]
            order = order[rank:total:world_size]
        return order

    def steps(self, epoch: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
        """Volume index of each patch, step by step: ``samples_per_volume`` patches per volume in
        the epoch's order, in steps of ``batch_size`` (the last may be smaller), as
        :func:`pipelines.data.patch_batches` groups them."""
        data = self.config.data
        patches = [v for v in self.epoch_volumes(epoch, rank, world_size) for _ in range(data.samples_per_volume)]
        return [patches[i:i + data.batch_size] for i in range(0, len(patches), data.batch_size)]

    def epoch_batches(self, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(image, label)`` batches ``(B, 1, *patch_size)`` float32 on the device, for one epoch.

        With ``lesion_hard_negative`` sampling the epoch's patches are counted by kind
        (:attr:`kind_counts`) and fallbacks to a random patch by reason (:attr:`fallback_counts`,
        logged at the end of the epoch when there are any)."""
        self.kind_counts, self.fallback_counts = Counter(), Counter()
        for step, volumes in enumerate(self.steps(epoch, rank, world_size)):
            yield self.batch(volumes, step_seed(self.config.seed, epoch, rank, step))
        if self.fallback_counts:
            log.info("epoch %d: %d of %d patches fell back to a random patch (%s)", epoch + 1,
                     sum(self.fallback_counts.values()), sum(self.kind_counts.values()),
                     "; ".join(f"{requested}: {reason} x{n}" for (requested, reason), n in sorted(self.fallback_counts.items())))

    # --- one step -----------------------------------------------------------------------------

    def _choose(self, index: int, draws: Sequence[float]) -> PatchChoice:
        """One patch's kind, drawn voxel and start (the rules of the module docstring)."""
        volume = self.volumes[index]
        shape = tuple(volume.image.shape[1:])
        size = self.patch_size
        if self.config.data.sampling == "slabs":
            start = tuple(min(int(draws[_START + a] * (shape[a] - size[a] + 1)), shape[a] - size[a]) for a in range(3))
            return PatchChoice(index, "slab", "slab", "", start, start)
        kind, requested, reason = "", "", ""
        if self.config.data.sampling == "lesion_hard_negative":
            requested = KINDS[0] if draws[_KIND] < self.kind_bounds[0] else KINDS[1] if draws[_KIND] < self.kind_bounds[1] else KINDS[2]
            flat, kind, reason = self._hard_negative_centre(volume, requested, draws[_CENTRE], shape)
        else:
            lesion_count = len(volume.lesions)
            background_count = int(np.prod(shape)) - lesion_count
            on_lesion = lesion_count > 0 and (background_count == 0 or draws[_KIND] < self.pos_fraction)
            if on_lesion:
                flat = int(volume.lesions[min(int(draws[_CENTRE] * lesion_count), lesion_count - 1)])
            else:
                flat = P.nth_background(min(int(draws[_CENTRE] * background_count), background_count - 1),
                                        volume.lesions, volume.ranks)
            kind = requested = "lesion" if on_lesion else "background"
        voxel = tuple(int(v) for v in np.unravel_index(flat, shape))
        start = tuple(P.crop_start(voxel[a], size[a], shape[a]) for a in range(3))
        return PatchChoice(index, kind, requested, reason, voxel, start)

    @staticmethod
    def _hard_negative_centre(volume: _Volume, requested: str, uniform: float, shape) -> Tuple[int, str, str]:
        """``(flat index, actual kind, fallback reason)``: :class:`planar3d.sampling.RandCropByLesionHardNegatived`'s
        draw with ``uniform`` as its one random number (uniform lesion voxel; hard negative uniform or
        by cumulative prior weight; uniform position; a kind without candidates falls back to random)."""
        reason = ""
        if requested == "lesion":
            count = len(volume.lesions)
            if count:
                return int(volume.lesions[min(int(uniform * count), count - 1)]), "lesion", ""
            reason = "no lesion voxel"
        elif requested == "hard_negative":
            candidates, cumulative = volume.hard_negatives, volume.cumweights
            count = len(candidates)
            if count:
                if cumulative is None:
                    return int(candidates[min(int(uniform * count), count - 1)]), "hard_negative", ""
                position = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
                return int(candidates[min(position, count - 1)]), "hard_negative", ""
            reason = "no bright non-lesion voxel"
        total = int(np.prod(shape))
        return min(int(uniform * total), total - 1), "random", reason

    def _cut(self, choices: Sequence[PatchChoice]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The patches, stacked, on the training device (sliced there, or on the host and copied)."""
        size = self.patch_size
        on_host = self.storage == "host" and self.device.type == "cuda"
        where = torch.device("cpu") if on_host else self.device
        image = torch.empty((len(choices), 1, *size), dtype=torch.float32, device=where, pin_memory=on_host)
        label = torch.empty((len(choices), 1, *size), dtype=torch.uint8, device=where, pin_memory=on_host)
        for i, choice in enumerate(choices):
            volume = self.volumes[choice.volume]
            x, y, z = choice.start
            region = (slice(None), slice(x, x + size[0]), slice(y, y + size[1]), slice(z, z + size[2]))
            image[i].copy_(volume.image[region])
            label[i].copy_(volume.label[region])
        return image.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True)

    def _to_device(self, values: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return values.pin_memory().to(self.device, non_blocking=True)
        return values.to(self.device)

    def batch(self, volumes: Sequence[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One batch: a patch from each of ``volumes``, all choices drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        # one row of uniform numbers per patch, as Python floats: indexing them costs no tensor op
        draws = torch.rand((len(volumes), _DRAWS), generator=generator, dtype=torch.float64).tolist()
        scanner = self.config.augmentation.scanner
        scanner_draws = None
        if scanner is not None:  # a second block, so the first one's numbers do not depend on it
            columns = _HIST_POINTS + max(scanner.histogram_control_points) - 2
            scanner_draws = torch.rand((len(volumes), columns), generator=generator, dtype=torch.float64).tolist()
        choices = [self._choose(index, draws[i]) for i, index in enumerate(volumes)]
        self.last_choices = choices
        if self.config.data.sampling == "lesion_hard_negative":
            self.kind_counts.update(c.kind for c in choices)
            self.fallback_counts.update((c.requested, c.fallback) for c in choices if c.fallback)
        image, label = self._cut(choices)
        label = label.float()
        image, label = self._augment(image, label, draws, seed)
        if scanner_draws is not None:
            image = self._scanner(image, choices, scanner_draws, seed)
        return image, label

    # --- augmentation -------------------------------------------------------------------------

    def _gamma(self, image: torch.Tensor, gammas: Dict[int, float]) -> None:
        for i, gamma in gammas.items():
            image[i] = P.adjust_gamma(image[i], gamma)

    def _bias(self, image: torch.Tensor, coefficients: Dict[int, Sequence[float]]) -> None:
        if not coefficients:
            return
        if self._legendre is None:
            self._legendre = P.legendre_bases(self.patch_size, device=self.device)
        matrices = P.bias_field_matrices(torch.tensor(list(coefficients.values()), dtype=torch.float64))
        fields = P.bias_fields(self._to_device(matrices), self._legendre)
        for n, i in enumerate(coefficients):
            image[i] = image[i] * fields[n]

    def _noise(self, image: torch.Tensor, stds: Dict[int, float], seed: int) -> None:
        if not stds:
            return
        self.noise_generator.manual_seed(seed)
        noise = torch.randn((len(stds), *image.shape[1:]), generator=self.noise_generator, device=self.device)
        for n, (i, std) in enumerate(stds.items()):
            image[i] = image[i] + noise[n] * std

    def _augment(self, image: torch.Tensor, label: torch.Tensor, draws: Sequence[Sequence[float]], seed: int):
        """Flips, in-plane affine, gamma, bias field, noise (``augmentation.*``, MONAI's order)."""
        aug = self.config.augmentation
        count = image.shape[0]
        for i in range(count):  # flips: per sample, decided on the host, so no mask travels
            dims = [1 + a for n, a in enumerate(self.in_plane) if draws[i][_FLIP + n] < aug.flip_prob]
            if dims:  # dims of one (1, X, Y, Z) sample
                image[i] = image[i].flip(dims)
                label[i] = label[i].flip(dims)
        if aug.affine_prob > 0 and (aug.rotate_degrees > 0 or aug.scale > 0):
            chosen = [i for i in range(count) if draws[i][_AFFINE] < aug.affine_prob]
            if chosen:
                thetas = []
                for i in chosen:
                    angle = np.radians(aug.rotate_degrees) * (2 * draws[i][_ANGLE] - 1)
                    scales = [1.0, 1.0, 1.0]
                    for n, a in enumerate(self.in_plane):
                        scales[a] = 1.0 + aug.scale * (2 * draws[i][_SCALE + n] - 1)
                    thetas.append(P.in_plane_theta(angle, scales, self.plane_axis, self.patch_size))
                theta = self._to_device(torch.stack(thetas))
                for n, i in enumerate(chosen):
                    image[i:i + 1], label[i:i + 1] = P.affine_resample(image[i:i + 1], label[i:i + 1], theta[n:n + 1])
        low, high = aug.gamma_range
        self._gamma(image, {i: low + (high - low) * draws[i][_GAMMA_VALUE]
                            for i in range(count) if aug.gamma_prob > 0 and draws[i][_GAMMA] < aug.gamma_prob})
        terms = len(P.bias_field_terms())
        self._bias(image, {i: [aug.bias_field_coeff * v for v in draws[i][_BIAS_COEFFS:_BIAS_COEFFS + terms]]
                           for i in range(count) if aug.bias_field_prob > 0 and draws[i][_BIAS] < aug.bias_field_prob})
        self._noise(image, {i: aug.noise_std * draws[i][_NOISE_STD]
                            for i in range(count) if aug.noise_prob > 0 and draws[i][_NOISE] < aug.noise_prob},
                    step_seed(seed, 1))
        return image, label

    def _scanner(self, image: torch.Tensor, choices: Sequence[PatchChoice], draws: Sequence[Sequence[float]],
                 seed: int) -> torch.Tensor:
        """``augmentation.scanner`` (:func:`planar3d.augment.scanner_augmentation`'s transforms, in
        its order, on the image only): thick slices (capped by the volume's spacing), Gaussian blur,
        bias field, histogram shift, gamma, noise."""
        p = self.config.augmentation.scanner
        count = image.shape[0]
        for i in range(count):
            row = draws[i]
            if p.thick_slice_prob > 0 and row[_THICK] < p.thick_slice_prob:
                axis = self.plane_axis if p.thick_slice_axis == "plane" else min(int(row[_THICK_AXIS] * 3), 2)
                low, high = p.thick_slice_factor
                factor: Optional[float] = low + (high - low) * row[_THICK_FACTOR]
                spacing = self.volumes[choices[i].volume].spacing
                if spacing is not None:
                    factor = capped_thickness_factor(factor, spacing[axis], p.thick_slice_max_mm)
                if factor is not None:
                    image[i] = simulate_thick_slices(image[i], axis, factor)
        low, high = p.blur_sigma
        for i in range(count):
            if p.blur_prob > 0 and draws[i][_BLUR] < p.blur_prob:
                sigmas = [low + (high - low) * draws[i][_BLUR_SIGMA + a] for a in range(3)]
                kernels = [self._to_device(k) for k in P.gaussian_kernels(sigmas)]
                image[i] = P.gaussian_blur(image[i], kernels)
        terms = len(P.bias_field_terms())
        self._bias(image, {i: [p.bias_field_coeff * v for v in draws[i][_SBIAS_COEFFS:_SBIAS_COEFFS + terms]]
                           for i in range(count) if p.bias_field_prob > 0 and draws[i][_SBIAS] < p.bias_field_prob})
        fewest, most = min(p.histogram_control_points), max(p.histogram_control_points)
        for i in range(count):
            if p.histogram_prob > 0 and draws[i][_HIST] < p.histogram_prob:
                points = fewest + min(int(draws[i][_HIST_COUNT] * (most - fewest + 1)), most - fewest)
                reference, floating = P.histogram_control_points(points, draws[i][_HIST_POINTS:])
                both = self._to_device(torch.stack([reference, floating]).float())
                image[i] = P.histogram_shift(image[i], both[0], both[1])
        low, high = p.gamma_range
        self._gamma(image, {i: low + (high - low) * draws[i][_SGAMMA_VALUE]
                            for i in range(count) if p.gamma_prob > 0 and draws[i][_SGAMMA] < p.gamma_prob})
        self._noise(image, {i: p.noise_std * draws[i][_SNOISE_STD]
                            for i in range(count) if p.noise_prob > 0 and draws[i][_SNOISE] < p.noise_prob},
                    step_seed(seed, 2))
        return image
