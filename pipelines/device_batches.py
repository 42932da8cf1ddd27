"""Training batches cut and augmented where the network runs (``data.loader: device``).

Why: on a GPU the MONAI loader (``data.loader: monai``: CPU transforms in DataLoader workers)
could not keep up with the training step (issue 10: 1.5-2e7 voxels/s, GPU busy < 60 % on an
H100, where a 16x256x256 slab forward + backward takes 16 ms). Here every preprocessed training
volume is loaded once and kept as a tensor -- on the GPU when it fits in half of its free memory,
else in pinned host memory -- and each step's patches are cut with slicing, then flipped,
deformed (``affine_grid``/``grid_sample``), gamma-adjusted, bias-field-multiplied and noised as
batched tensor operations on the training device (:mod:`planar3d.patches`). No worker processes,
no per-sample CPU transform; on the CPU it is the same code with ``device=cpu``.

Samples (same distributions as the MONAI chain of :mod:`pipelines.data`, not the same numbers):

* ``lesion``: a patch is centred on a uniformly drawn lesion voxel with probability
  ``pos_neg_ratio / (pos_neg_ratio + 1)``, else on a uniformly drawn background voxel
  (``RandCropByPosNegLabeld(pos=pos_neg_ratio, neg=1)``; a volume without lesion gives background
  centres only); volumes are edge-padded to at least the patch size first, and a centre near the
  border moves the least needed for the patch to fit (MONAI's rule).
* ``slabs``: ``slab_planes`` planes over the whole in-plane extent (volumes edge-padded to the
  largest training scan), at a uniform position.
* Other sampling modes are refused (:class:`planar3d.errors.ConfigError`), never silently replaced.

Augmentation, in MONAI's order and with its parameter distributions: in-plane flips (each axis
with ``flip_prob``), in-plane rotation ``U(-rotate_degrees, rotate_degrees)`` and scale
``1 + U(-scale, scale)`` per in-plane axis with ``affine_prob`` (image trilinear, label nearest,
border padding), gamma ``U(gamma_range)`` keeping mean and std, bias field (degree 3, coefficients
``U(0, bias_field_coeff)``), Gaussian noise of std ``U(0, noise_std)``.

Randomness: an epoch's volume order is drawn from ``(seed, epoch)`` (shared by all ranks, then
sharded like ``DistributedSampler``), and step ``s``'s choices from a generator seeded with
``(seed, epoch, rank, s)``: kinds, centres and augmentation parameters on the CPU, the noise
field on the training device. So any batch is a pure function of those four numbers: a resumed
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from planar3d import patches as P
from planar3d.errors import ConfigError
from planar3d.preprocess import load_preprocessed

from pipelines.config import TrainConfig

log = logging.getLogger("planar3d.train")

DEVICE_SAMPLING = ("lesion", "slabs")
#: Share of the GPU's free memory the cached volumes may take before they are kept in pinned host memory.
DEVICE_MEMORY_SHARE = 0.5
_CACHE_FORMAT = "planar3d-device-cache/1"

# columns of the per-patch uniform draws (one row per patch, the same layout for every step)
_KIND, _CENTRE, _START = 0, 1, 2            # _START.._START+2: slab start per axis
_FLIP = 5                                   # two in-plane axes
_AFFINE, _ANGLE, _SCALE = 7, 8, 9           # _SCALE, _SCALE+1: two in-plane axes
_GAMMA, _GAMMA_VALUE = 11, 12
_BIAS, _BIAS_COEFFS = 13, 14                # 20 coefficients
_NOISE, _NOISE_STD = 14 + len(P.bias_field_terms()), 15 + len(P.bias_field_terms())
_DRAWS = _NOISE_STD + 1


def step_seed(*values: int) -> int:
    """A 63-bit seed mixing ``values`` (e.g. seed, epoch, rank, step) with numpy's ``SeedSequence``."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def check_device_loader_config(config: TrainConfig) -> None:
    """Refuse configurations the device loader does not implement, naming them."""
    if config.data.sampling not in DEVICE_SAMPLING:
        raise ConfigError(f"data.loader=device with data.sampling={config.data.sampling}: the device loader "
                          f"samples only {' and '.join(DEVICE_SAMPLING)}; use data.loader=monai for this sampling")


def cache_key(image: Path, label: Path, normalization) -> str:
    """Name of a case's persistent cache file: changes with either file or the normalisation."""
    parts = {"format": _CACHE_FORMAT, "normalization": normalization.to_dict()}
    for name, path in (("image", image), ("label", label)):
        stat = Path(path).stat()
        parts[name] = [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, allow_nan=False).encode()).hexdigest()[:32]


def load_volume(case, normalization, cache_dir: Optional[Path]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(image (1, X, Y, Z) float32, label (1, X, Y, Z) uint8)`` preprocessed as prediction does
    (:func:`planar3d.preprocess.load_preprocessed`); read from / written to ``cache_dir`` if given."""
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{cache_key(case.image, case.label, normalization)}.pt"
        if path.is_file():
            stored = torch.load(path, weights_only=True)
            return stored["image"], stored["label"]
    scan = load_preprocessed(case.image, normalization, label=case.label)
    image = torch.from_numpy(np.ascontiguousarray(scan.volume[None], dtype=np.float32))
    label = torch.from_numpy(np.ascontiguousarray(scan.label[None] > 0)).to(torch.uint8)
    if path is not None:
        from planar3d.io import atomic_write

        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as stream:
            torch.save({"image": image, "label": label}, stream)
    return image, label


@dataclass
class _Volume:
    image: torch.Tensor            # (1, X, Y, Z) float32, padded, on the storage device
    label: torch.Tensor            # (1, X, Y, Z) uint8, same
    lesions: torch.Tensor          # sorted flat indices of lesion voxels (CPU int64)
    ranks: torch.Tensor            # planar3d.patches.background_ranks(lesions)


class DevicePatchLoader:
    """Training batches from volumes held once as tensors (module docstring).

    Args:
        volumes: ``(image, label)`` per training case, channel-first ``(1, X, Y, Z)`` (preprocessed,
            RAS), on the CPU.
        config: the training config (``data`` and ``augmentation`` sections are used).
        plane_axis: the network's plane axis (flips, rotation and slabs are about it).
        device: the training device; batches come out there.
        storage: ``auto`` (the device when the volumes take at most half its free memory, else
            pinned host memory), ``device`` or ``host``.
    """

    def __init__(self, volumes: Sequence[Tuple[torch.Tensor, torch.Tensor]], config: TrainConfig, plane_axis: int,
                 device: torch.device, storage: str = "auto"):
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
        padded = [(P.pad_symmetric_edge(image, size), P.pad_symmetric_edge(label, size)) for image, label in volumes]
        self.storage = self._choose_storage(storage, padded)
        self.volumes: List[_Volume] = []
        for image, label in padded:
            lesions = torch.nonzero(label[0].reshape(-1)).reshape(-1).to(torch.int64)
            image, label = image.contiguous(), label.contiguous()
            if self.storage == "device":
                image, label = image.to(self.device), label.to(self.device)
            elif self.device.type == "cuda":
                image, label = image.pin_memory(), label.pin_memory()
            self.volumes.append(_Volume(image, label, lesions, P.background_ranks(lesions)))
        self.noise_generator = torch.Generator(device=self.device)
        self._legendre: Optional[Tuple[torch.Tensor, ...]] = None  # bias-field bases of the patch shape
        log.info("device loader: %d volumes (%.0f MB) kept on %s, patches %s made on %s", len(self.volumes),
                 sum(v.image.numel() * 5 for v in self.volumes) / 1e6,
                 self.device if self.storage == "device" else "the host (pinned)" if self.device.type == "cuda" else "the host",
                 "x".join(map(str, self.patch_size)), self.device)

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
        memory either way: sampling on the device needs them there).
        """
        check_device_loader_config(config)
        cache_dir = Path(run_dir) / "cache" / "device" if config.data.cache == "disk" and run_dir is not None else None
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(cases)))) as pool:
            volumes = list(pool.map(lambda case: load_volume(case, config.normalization, cache_dir), cases))
        return cls(volumes, config, plane_axis, device, storage)

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
        """``(image, label)`` batches ``(B, 1, *patch_size)`` float32 on the device, for one epoch."""
        for step, volumes in enumerate(self.steps(epoch, rank, world_size)):
            yield self.batch(volumes, step_seed(self.config.seed, epoch, rank, step))

    # --- one step -----------------------------------------------------------------------------

    def _starts(self, volume: _Volume, draws: Sequence[float]) -> List[int]:
        shape = volume.image.shape[1:]
        size = self.patch_size
        if self.config.data.sampling == "slabs":
            return [min(int(draws[_START + a] * (shape[a] - size[a] + 1)), shape[a] - size[a]) for a in range(3)]
        lesion_count = len(volume.lesions)
        background_count = int(np.prod(shape)) - lesion_count
        on_lesion = lesion_count > 0 and (background_count == 0 or draws[_KIND] < self.pos_fraction)
        if on_lesion:
            flat = int(volume.lesions[min(int(draws[_CENTRE] * lesion_count), lesion_count - 1)])
        else:
            flat = P.nth_background(min(int(draws[_CENTRE] * background_count), background_count - 1),
                                    volume.lesions, volume.ranks)
        centre = np.unravel_index(flat, shape)
        return [P.crop_start(int(centre[a]), size[a], shape[a]) for a in range(3)]

    def _cut(self, volumes: Sequence[int], draws: Sequence[Sequence[float]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The patches, stacked, on the training device (sliced there, or on the host and copied)."""
        size = self.patch_size
        on_host = self.storage == "host" and self.device.type == "cuda"
        where = torch.device("cpu") if on_host else self.device
        image = torch.empty((len(volumes), 1, *size), dtype=torch.float32, device=where, pin_memory=on_host)
        label = torch.empty((len(volumes), 1, *size), dtype=torch.uint8, device=where, pin_memory=on_host)
        for i, index in enumerate(volumes):
            volume = self.volumes[index]
            x, y, z = self._starts(volume, draws[i])
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
        image, label = self._cut(volumes, draws)
        label = label.float()
        return self._augment(image, label, draws, seed)

    def _augment(self, image: torch.Tensor, label: torch.Tensor, draws: Sequence[Sequence[float]], seed: int):
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
        if aug.gamma_prob > 0:
            low, high = aug.gamma_range
            for i in range(count):
                if draws[i][_GAMMA] < aug.gamma_prob:
                    image[i] = P.adjust_gamma(image[i], low + (high - low) * draws[i][_GAMMA_VALUE])
        if aug.bias_field_prob > 0:
            chosen = [i for i in range(count) if draws[i][_BIAS] < aug.bias_field_prob]
            if chosen:
                terms = len(P.bias_field_terms())
                coefficients = torch.tensor([draws[i][_BIAS_COEFFS:_BIAS_COEFFS + terms] for i in chosen])
                coefficients = coefficients * aug.bias_field_coeff
                if self._legendre is None:
                    self._legendre = P.legendre_bases(self.patch_size, device=self.device)
                fields = P.bias_fields(self._to_device(P.bias_field_matrices(coefficients)), self._legendre)
                for n, i in enumerate(chosen):
                    image[i] = image[i] * fields[n]
        if aug.noise_prob > 0:
            chosen = [i for i in range(count) if draws[i][_NOISE] < aug.noise_prob]
            if chosen:
                self.noise_generator.manual_seed(step_seed(seed, 1))
                noise = torch.randn((len(chosen), *image.shape[1:]), generator=self.noise_generator, device=self.device)
                for n, i in enumerate(chosen):
                    image[i] = image[i] + noise[n] * (aug.noise_std * draws[i][_NOISE_STD])
        return image, label
