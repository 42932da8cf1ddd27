"""Training data: manifest checks, loading with the exact prediction preprocessing, augmentation,
patch sampling and reproducible data loaders (MONAI dictionary transforms).

Loading is :class:`LoadPreprocessd`, which calls :func:`planar3d.preprocess.load_preprocessed`,
the entry point ``planar3d predict`` uses too, so a network never sees data prepared in a way
prediction does not repeat. Arrays come out channel-first, ``(1, X, Y, Z)`` in RAS order.

Randomness: every epoch's augmentation and sampling is a function of ``(seed, epoch, rank)``
only (:func:`make_loader` reseeds the transforms and the loader's generator each epoch), so a
resumed run draws exactly the patches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from planar3d.data.checks import check_manifest
from planar3d.data.manifest import Case, Manifest
from planar3d.errors import InputError
from planar3d.planes import is_thick_slice, plane_axis_from_spacing
from planar3d.preprocess import NormalizationConfig, Reorientation, load_preprocessed

from pipelines.config import TrainConfig

log = logging.getLogger("planar3d.train")


class LoadPreprocessd(MapTransform):
    """Load ``image`` (and ``label``) paths into preprocessed channel-first tensors.

    Same semantics as ``LoadImaged`` + ``EnsureChannelFirstd``, but the preprocessing is the one
    prediction uses, exactly. Also sets ``spacing`` (RAS voxel spacing, mm; caps simulated slice
    thickness) and, when the item has a ``brain_mask`` path, reads that mask on the image's grid
    and reorients it the same way: ``brain_mask`` becomes the hard-negative prior, ``(1, X, Y, Z)``
    float32 (:func:`planar3d.sampling.hard_negative_weights`), weighted towards grey matter by
    ``grey_matter_weight`` when the item also has a ``grey_matter`` path (the percent map of
    :func:`planar3d.data.synth.grey_matter_path`; ``""``: none for this case, the mask alone).
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), normalization: NormalizationConfig = NormalizationConfig(),
                 grey_matter_weight: float = 0.0):
        super().__init__(keys, allow_missing_keys=True)
        self.normalization = normalization
        self.grey_matter_weight = float(grey_matter_weight)

    @staticmethod
    def _sidecar(path: str, what: str, scan, image: str) -> np.ndarray:
        """A sidecar map of the case (brain mask, grey matter) reoriented like its image."""
        from planar3d.io import read_volume

        data, _ = read_volume(path, dtype=None)
        if data.shape[:3] != tuple(scan.reorientation.source_shape):
            raise InputError(path, f"{what} shape {data.shape} differs from the image's "
                             f"{tuple(scan.reorientation.source_shape)} ({image})")
        return scan.reorientation.forward(np.asarray(data))

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        scan = load_preprocessed(data["image"], self.normalization, label=data.get("label"))
        out["image"] = torch.from_numpy(np.ascontiguousarray(scan.volume[None], dtype=np.float32))
        if scan.label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(scan.label[None], dtype=np.float32))
        out["spacing"] = np.asarray(scan.reorientation.spacing, dtype=np.float64)
        if "brain_mask" in data and not data["brain_mask"]:  # asked for, none for this case: no weights
            out["brain_mask"] = np.ones((1,) + scan.volume.shape, np.float32)
        elif data.get("brain_mask"):
            from planar3d.sampling import hard_negative_weights

            mask = self._sidecar(data["brain_mask"], "brain mask", scan, data["image"])
            grey_matter = None
            if data.get("grey_matter") and self.grey_matter_weight > 0:
                grey_matter = self._sidecar(data["grey_matter"], "grey-matter map", scan, data["image"]) / np.float32(100)
            out["brain_mask"] = np.ascontiguousarray(hard_negative_weights(mask, grey_matter, self.grey_matter_weight)[None])
        out.pop("grey_matter", None)
        return out


def case_spacing(case: Case) -> Tuple[float, float, float]:
    """Voxel spacing of a case's image along the RAS-ordered axes (header only)."""
    image = nib.load(str(case.image))
    return Reorientation(image.affine, image.shape).spacing


def case_shape(case: Case) -> Tuple[int, int, int]:
    """Shape of a case's image after reorientation to RAS (header only)."""
    image = nib.load(str(case.image))
    return tuple(Reorientation(image.affine, image.shape).shape[:3])  # type: ignore[return-value]


def resolve_geometry(config: TrainConfig, cases: Sequence[Case]) -> Tuple[int, Tuple[bool, bool, bool, bool]]:
    """``(plane_axis, pool_across_planes)``, resolving ``auto`` from the first training case.

    ``plane_axis: auto`` takes :func:`plane_axis_from_spacing` of that case's RAS spacing;
    ``pool_across_planes: auto`` pools in-plane only at the first two levels for a thick-slice
    scan, 2x2x2 at every level otherwise.
    """
    spacing = case_spacing(cases[0])
    network = config.network
    axis = plane_axis_from_spacing(spacing) if network.plane_axis == "auto" else int(network.plane_axis)
    if network.pool_across_planes == "auto":
        pools = (False, False, True, True) if is_thick_slice(spacing, axis) else (True, True, True, True)
    else:
        pools = tuple(bool(v) for v in network.pool_across_planes)
    log.info("geometry from %s (RAS spacing %s): plane_axis=%d, pool_across_planes=%s",
             cases[0].id, tuple(round(s, 3) for s in spacing), axis, pools)
    return axis, pools  # type: ignore[return-value]


def check_cases(manifest: Manifest, cases: Sequence[Case]) -> None:
    """Run the input checks (files, hashes, 3D, NaN, binary labels, grids) on ``cases``.

    Raises:
        InputError: naming the manifest, with every problem found (one per line).
    """
    problems = check_manifest(manifest, cases, verify_hashes=True)
    if problems:
        where = manifest.source or manifest.dataset
        raise InputError(where, f"{len(problems)} problem(s) in the training cases:\n" + "\n".join(problems))


def split_validation(cases: Sequence[Case], val_cases: int, seed: int) -> Tuple[List[Case], List[Case]]:
    """``(train, validation)``: ``val_cases`` cases drawn by ``seed``, at least one left to train."""
    cases = list(cases)
    count = min(val_cases, max(len(cases) - 1, 0))
    chosen = set(random.Random(seed).sample(range(len(cases)), count))
    return [c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen]


def spread_over_load(cases: Sequence[Case], count: int, load_of: Callable[[Case], float]) -> List[Case]:
    """``count`` of ``cases`` at evenly spaced ranks of lesion load, lightest first.

    Why: a held-out host's light-load cases are the ones that show a flood of false positives
    (issue 9); a random draw of 4 of 12 cases with 3 light ones misses all of them one time in
    four. Ranks ``(i + 1/2) n / count`` cover the range; ties keep the given order.

    Example:
        >>> [c for c in spread_over_load(list("abcdefgh"), 2, load_of="hgfedcba".index)]
        ['f', 'b']
    """
    ranked = sorted(cases, key=load_of)
    count = min(count, len(ranked))
    return [ranked[int((i + 0.5) * len(ranked) / count)] for i in range(count)]


def split_validation_by_host(cases: Sequence[Case], val_cases: int, seed: int,
                             load_of: Optional[Callable[[Case], float]] = None,
                             ) -> Tuple[List[Case], List[Case], List[Case]]:
    """``(train, validation, set aside)`` with validation cases from hosts no training case shares.

    Why: injected cases of one host share its anatomy and contrast; validating on them rewards
    over-segmenting that head (issue 9). Hosts (:func:`planar3d.data.hosts.host_key`) are
    drawn in a ``seed``-shuffled order; ``val_cases`` cases of the first drawn host(s) validate
    and their hosts' other cases are *set aside* (neither trained on nor validated). Within a
    host the cases are drawn by ``seed``, or, given ``load_of`` (a case's lesion load), spread
    over its loads (:func:`spread_over_load`). Cases without a host (phantoms, real data sets)
    always train. Without any host, or when holding out a host would leave no training case,
    this is :func:`split_validation`.
    """
    from planar3d.data.hosts import host_key

    cases = list(cases)
    hosts = sorted({host_key(c) for c in cases} - {None})
    if not hosts or val_cases <= 0:
        train, validation = split_validation(cases, val_cases, seed)
        return train, validation, []
    rng = random.Random(seed)
    rng.shuffle(hosts)
    validation: List[Case] = []
    held_out: set = set()
    for host in hosts:
        if len(validation) >= val_cases:
            break
        of_host = [c for c in cases if host_key(c) == host]
        wanted = min(val_cases - len(validation), len(of_host))
        validation += spread_over_load(of_host, wanted, load_of) if load_of else rng.sample(of_host, wanted)
        held_out.add(host)
    train = [c for c in cases if host_key(c) not in held_out]
    if not train:
        train, validation = split_validation(cases, val_cases, seed)
        return train, validation, []
    chosen = {c.id for c in validation}
    aside = [c for c in cases if host_key(c) in held_out and c.id not in chosen]
    return train, validation, aside


def _patch_size(size: Sequence[int], shapes: Sequence[Sequence[int]]) -> List[int]:
    """``-1`` entries become the largest extent of that axis over ``shapes``."""
    return [max(s[a] for s in shapes) if int(v) < 0 else int(v) for a, v in enumerate(size)]


def hard_negative_threshold(config: TrainConfig) -> float:
    """The hard-negative brightness threshold in the network's input units.

    ``data.hard_negative.brightness_factor`` is relative to white matter
    (``normalization.white_matter_value`` after the white-matter-peak normalisation); the
    network input is then standardised with ``normalization.mean``/``std``.
    """
    n = config.normalization
    threshold = (config.data.hard_negative.brightness_factor * n.white_matter_value - n.mean) / n.std
    if threshold <= 0:
        from planar3d.errors import ConfigError

        raise ConfigError(f"data.hard_negative.brightness_factor={config.data.hard_negative.brightness_factor}: "
                          f"the threshold {threshold:.3g} in network units must be > 0 (raise the factor)")
    return float(threshold)


def centre_indices_transform(config: TrainConfig):
    """The :class:`planar3d.sampling.PatchCentreIndicesd` of ``lesion_hard_negative`` sampling
    (both loaders compute their candidate centres with it, on the padded volume): the
    brightness threshold in network units (so the factor is the threshold and white matter is
    1), ``data.hard_negative.margin``, and the ``brain_mask`` key as prior when
    ``data.hard_negative.prior`` asks for it, floored at ``data.hard_negative.outside_weight``."""
    from planar3d.sampling import PatchCentreIndicesd

    return PatchCentreIndicesd("image", "label", brightness_factor=hard_negative_threshold(config), white_matter_value=1.0,
                               margin=config.data.hard_negative.margin,
                               prior_key="brain_mask" if uses_brain_masks(config) else None,
                               prior_floor=config.data.hard_negative.outside_weight)


def sampling_transforms(config: TrainConfig, plane_axis: int, shapes: Sequence[Sequence[int]]) -> list:
    """Patch sampling: ``slabs`` (published), ``lesion`` (positive/negative centred crops) or
    ``lesion_hard_negative`` (lesion, hard-negative and random centres, :mod:`planar3d.sampling`).

    ``slabs``: ``slab_planes`` consecutive planes along ``plane_axis`` over the whole in-plane
    extent (padded to the largest training scan, so patches batch), at random positions.
    ``lesion_hard_negative``: the candidate centres are computed once per volume (cached with the
    volume), with the case's ``brain_mask`` as weights when ``data.hard_negative.prior`` asks for
    it and the case has one.
    """
    from monai.transforms import RandCropByPosNegLabeld, RandSpatialCropSamplesd, SpatialPadd

    data = config.data
    keys = ("image", "label")
    if data.sampling == "slabs":
        size = [max(s[a] for s in shapes) for a in range(3)]
        size[plane_axis] = data.slab_planes
        return [
            SpatialPadd(keys, size, mode="edge"),
            RandSpatialCropSamplesd(keys, size, num_samples=data.samples_per_volume, random_size=False),
        ]
    size = _patch_size(data.patch_size, shapes)
    if data.sampling == "lesion_hard_negative":
        from planar3d.sampling import RandCropByLesionHardNegatived

        pads = [SpatialPadd(keys, size, mode="edge")]
        if uses_brain_masks(config):  # the prior is padded like the image, so indices stay aligned
            pads = [SpatialPadd(keys, size, mode="edge"), SpatialPadd("brain_mask", size, mode="constant", allow_missing_keys=True)]
        return pads + [
            centre_indices_transform(config),
            RandCropByLesionHardNegatived(keys, size, ratios=tuple(data.ratios), num_samples=data.samples_per_volume),
        ]
    ratio = data.pos_neg_ratio
    return [
        SpatialPadd(keys, size, mode="edge"),
        RandCropByPosNegLabeld(keys, "label", size, pos=ratio, neg=1.0 if ratio > 0 else 1.0,
                               num_samples=data.samples_per_volume, allow_smaller=False),
    ]


def augmentation_transforms(config: TrainConfig, plane_axis: int) -> list:
    """In-plane flips, small in-plane affine, gamma, bias field and Gaussian noise, then with
    ``augmentation.scanner`` the scanner variations of :func:`planar3d.augment.scanner_augmentation`
    (thick slices capped by the case's ``spacing``)."""
    from monai.transforms import (RandAdjustContrastd, RandAffined, RandBiasFieldd, RandFlipd,
                                  RandGaussianNoised)

    aug = config.augmentation
    keys = ("image", "label")
    in_plane = [a for a in range(3) if a != plane_axis]
    out: list = []
    if aug.flip_prob > 0:
        out += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=a) for a in in_plane]
    if aug.affine_prob > 0 and (aug.rotate_degrees > 0 or aug.scale > 0):
        rotate = [0.0, 0.0, 0.0]
        rotate[plane_axis] = math.radians(aug.rotate_degrees)  # rotation about the plane axis = in the plane
        scale = [aug.scale if a != plane_axis else 0.0 for a in range(3)]
        out.append(RandAffined(keys, prob=aug.affine_prob, rotate_range=rotate, scale_range=scale,
                               mode=("bilinear", "nearest"), padding_mode="border"))
    if aug.gamma_prob > 0:
        out.append(RandAdjustContrastd("image", prob=aug.gamma_prob, gamma=tuple(aug.gamma_range), retain_stats=True))
    if aug.bias_field_prob > 0:
        out.append(RandBiasFieldd("image", prob=aug.bias_field_prob, coeff_range=(0.0, aug.bias_field_coeff)))
    if aug.noise_prob > 0:
        out.append(RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std))
    if aug.scanner is not None:
        from planar3d.augment import scanner_augmentation

        out += scanner_augmentation(aug.scanner, plane_axis, keys=("image",), spacing_key="spacing")
    return out


def training_transform(config: TrainConfig, plane_axis: int, shapes: Sequence[Sequence[int]]):
    """The whole training chain: load (cached) -> sample -> augment -> tensors."""
    from monai.transforms import Compose, EnsureTyped

    return Compose(
        [LoadPreprocessd(normalization=config.normalization, grey_matter_weight=config.data.hard_negative.grey_matter_weight)]
        + sampling_transforms(config, plane_axis, shapes)
        + augmentation_transforms(config, plane_axis)
        + [EnsureTyped(("image", "label"), dtype=torch.float32, track_meta=False)]
    )


def uses_brain_masks(config: TrainConfig) -> bool:
    """Whether training reads the cases' brain masks (hard-negative prior)."""
    return config.data.sampling == "lesion_hard_negative" and config.data.hard_negative.prior == "brain_mask"


def uses_grey_matter(config: TrainConfig) -> bool:
    """Whether training also reads the cases' grey-matter maps (the brain-mask prior weighted towards grey matter)."""
    return uses_brain_masks(config) and config.data.hard_negative.grey_matter_weight > 0


def brain_masks_of(cases: Sequence[Case]) -> Dict[str, Optional[Path]]:
    """``{case id: brain mask path or None}``: the sidecars ``planar3d synth`` writes."""
    from planar3d.data.synth import brain_mask_path

    return {c.id: (brain_mask_path(c.image) if brain_mask_path(c.image).is_file() else None) for c in cases}


def grey_matter_of(cases: Sequence[Case]) -> Dict[str, Optional[Path]]:
    """``{case id: grey-matter map path or None}``: the sidecars ``planar3d synth`` writes."""
    from planar3d.data.synth import grey_matter_path

    return {c.id: (grey_matter_path(c.image) if grey_matter_path(c.image).is_file() else None) for c in cases}


def prior_sidecars(config: TrainConfig, cases: Sequence[Case]) -> Dict[str, Dict[str, str]]:
    """``{case id: {"brain_mask": path, ["grey_matter": path]}}`` for the hard-negative prior
    (``""`` where a case has none), or ``{}`` when the config uses no prior. Both loaders read
    their cases' sidecars through this."""
    if not uses_brain_masks(config):
        return {}
    wanted = {"brain_mask": brain_masks_of(cases)}
    if uses_grey_matter(config):
        wanted["grey_matter"] = grey_matter_of(cases)
    return {c.id: {key: str(paths[c.id]) if paths[c.id] else "" for key, paths in wanted.items()} for c in cases}


def case_items(cases: Sequence[Case], sidecars: Optional[Dict[str, Dict[str, str]]] = None) -> List[dict]:
    """Loader items; with ``sidecars`` (:func:`prior_sidecars`) each item carries its prior's
    paths (``""`` when the case has none: without a brain mask its hard negatives are unweighted)."""
    items = [{"image": str(c.image), "label": str(c.label), "id": c.id} for c in cases]
    for item in items:
        item.update((sidecars or {}).get(item["id"], {}))
    return items


def build_dataset(config: TrainConfig, cases: Sequence[Case], transform, run_dir: Path):
    """``CacheDataset`` (memory), ``PersistentDataset`` (``run_dir/cache``) or plain ``Dataset``."""
    from monai.data import CacheDataset, Dataset, PersistentDataset

    items = case_items(cases, prior_sidecars(config, cases))
    if config.data.cache == "memory":
        return CacheDataset(items, transform, num_workers=1, progress=False)
    if config.data.cache == "disk":
        return PersistentDataset(items, transform, cache_dir=run_dir / "cache")
    return Dataset(items, transform)


def _seed_everything_in(transform, seed: int) -> None:
    if isinstance(transform, Randomizable):
        transform.set_random_state(seed=seed % (2**32))


def make_loader(dataset, config: TrainConfig, epoch: int, rank: int = 0, world_size: int = 1, device=None):
    """A DataLoader for one epoch whose randomness depends only on ``(seed, epoch, rank)``.

    The transforms are reseeded (used directly when ``num_workers == 0``); workers are reseeded
    by MONAI's ``worker_init_fn`` from the loader's seeded generator. With a CUDA ``device`` the
    batches come in pinned memory (so the training loop's ``non_blocking`` copies overlap);
    ``num_workers: auto`` is :func:`pipelines.loader_workers.resolve_num_workers`;
    ``persistent_workers: true`` returns the run-long loader of :mod:`pipelines.loader_workers`.
    """
    from monai.data import DataLoader
    from monai.data.utils import worker_init_fn
    from torch.utils.data import DistributedSampler

    from pipelines.loader_workers import resolve_num_workers

    device = torch.device(device or "cpu")
    num_workers = resolve_num_workers(config.data.num_workers, device)
    if config.data.persistent_workers:  # one loader for the run; the epoch travels with each item
        from pipelines.loader_workers import persistent_loader

        return persistent_loader(dataset, config, epoch, device, num_workers, rank, world_size)

    epoch_seed = (config.seed * 1_000_003 + epoch * 1009 + rank) % (2**31)
    _seed_everything_in(dataset.transform, epoch_seed)
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=1,  # one volume's patches at a time; patch_batches() forms the steps
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def patch_batches(loader, batch_size: int):
    """Regroup the loader's per-volume patch batches into steps of ``batch_size`` patches.

    ``data.batch_size`` counts patches (slabs), as in the paper (3 slabs per step), whatever
    ``samples_per_volume`` is; the last step of an epoch may be smaller.
    """
    images: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    count = 0
    for item in loader:
        images.append(item["image"])
        labels.append(item["label"])
        count += item["image"].shape[0]
        while count >= batch_size:
            image, label = torch.cat(images), torch.cat(labels)
            yield image[:batch_size], label[:batch_size]
            images, labels = [image[batch_size:]], [label[batch_size:]]
            count -= batch_size
    if count:
        yield torch.cat(images), torch.cat(labels)


def load_validation_volumes(cases: Sequence[Case], normalization: NormalizationConfig = NormalizationConfig()
                            ) -> List[Tuple[str, np.ndarray, np.ndarray, Tuple[float, float, float]]]:
    """``(case id, image (X, Y, Z), label (X, Y, Z) bool, RAS spacing mm)`` for each validation case."""
    out = []
    for case in cases:
        scan = load_preprocessed(case.image, normalization, label=case.label)
        out.append((case.id, scan.volume, scan.label, scan.reorientation.spacing))
    return out
