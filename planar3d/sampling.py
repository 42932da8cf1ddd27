"""Patch sampling with hard negatives: patches centred on bright voxels that are not lesions.

Why: lesion-centred plus random patches almost never show the network the bright structures a
FLAIR has outside lesions (cortex, septum pellucidum, choroid plexus, flow artefacts, vessel
edges), because they are a small fraction of the head; on a new patient it then calls them
lesions (issue 9: 232 predicted lesions for 33 real ones on a light-load scan). A third kind of
patch, centred on such voxels, makes them part of every epoch.

Two MONAI dictionary transforms, used as a pair (like ``FgBgToIndicesd`` before
``RandCropByPosNegLabeld``):

* :class:`PatchCentreIndicesd` (deterministic, so ``CacheDataset`` caches its output): once per
  volume, the flat indices of lesion voxels and of *hard-negative* voxels: intensity
  ``> brightness_factor * white_matter_value`` (the image is normalised so white matter is
  ``white_matter_value``) and outside the lesion mask dilated by ``margin`` voxels (so lesion
  borders, partial-volume voxels of a lesion, are not called negatives). With a ``prior_key``
  (e.g. a cortex probability mapped into the scan), the prior's values at those voxels become
  sampling weights, stored as a cumulative sum so that drawing is a binary search.
* :class:`RandCropByLesionHardNegatived` (``Randomizable``): ``num_samples`` patches of
  ``spatial_size``; each patch's kind is drawn with probabilities ``ratios`` (lesion,
  hard-negative, random); its centre is a uniformly drawn lesion voxel, a (weighted) drawn
  hard-negative voxel, or a uniform position. Centres are moved the least needed for the patch to
  lie inside the volume (MONAI's rule), so the drawn voxel is always inside its patch, and it is
  the exact centre when it lies at least half a patch from the border.

Fallback (documented semantics, never silent): a patch whose kind has no candidate (no lesion
voxel, or no bright non-lesion voxel) is a *random* patch instead; each output patch records
``patch_kind`` (the kind it really is), ``patch_requested`` (the kind drawn) and
``patch_fallback`` (the reason, ``""`` when none), so a pipeline can count fallbacks per epoch.

Randomness: only ``self.R`` (seeded by ``set_random_state``), so a fixed seed gives the same
patches.

Example:
    >>> import numpy as np
    >>> image = np.full((1, 16, 16, 16), 0.5, np.float32); image[0, 8, 8, 8] = 1.0
    >>> data = {"image": image, "label": np.zeros_like(image)}
    >>> data = PatchCentreIndicesd("image", "label")(data)
    >>> crop = RandCropByLesionHardNegatived(("image", "label"), (4, 4, 4), ratios=(0, 1, 0), num_samples=2)
    >>> [p["patch_voxel"] for p in crop.set_random_state(seed=0)(data)]
    [(8, 8, 8), (8, 8, 8)]
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

KINDS = ("lesion", "hard_negative", "random")

#: Default intensity factor over white matter above which a non-lesion voxel is a hard negative.
#: FLAIR lesions are typically 1.3-2x white matter. Measured on the four clinical/1 mm real FLAIRs
#: of ``../shared/data/real`` (white-matter-peak normalisation): 34-49 % of the head's voxels
#: (> 0.5x white matter) pass at 1.25, 17-35 % at 1.6, most of them scalp fat and grey matter.
#: 1.1 (was 1.25): the false positives of models trained without a host lie in its grey matter
#: (median grey/white ratio 1.02-1.13 across the real hosts), and down to 1.1 more of it is
#: sampled; on two left-out hosts, three seeds each, light-case lesion PPV and heavy-case Dice
#: rose (docs/training.md, "Issue 9, eleventh session"). On whole-head scans pass a
#: ``prior_key`` (brain mask or cortex probability mapped into the scan) so the patches show
#: the brain's bright structures, not mostly the scalp.
BRIGHTNESS_FACTOR = 1.1


def hard_negative_weights(brain_mask: np.ndarray, grey_matter: Optional[np.ndarray] = None,
                          grey_matter_weight: float = 0.0) -> np.ndarray:
    """A case's hard-negative prior (``prior_key`` of :class:`PatchCentreIndicesd`), float32.

    ``brain_mask`` (``> 0`` is brain) weighted towards grey matter: ``mask x (1 + w x g)`` with
    ``g`` the grey-matter fraction in [0, 1] (``None``: no map for this case, the mask alone).
    Why: the false positives of models trained without a host lie in that host's cortex and deep
    grey matter (docs/training.md, "Issue 9, eleventh session"), while the mask alone spreads the
    centres over every bright structure of the brain, which the weight keeps (``1 +``): septum,
    choroid plexus and vessels are hard negatives too.

    Example:
        >>> hard_negative_weights(np.array([1, 1, 0]), np.array([0.0, 0.5, 1.0]), 2.0).tolist()
        [1.0, 2.0, 0.0]
    """
    if grey_matter_weight < 0:
        raise ValueError(f"grey_matter_weight must be >= 0, got {grey_matter_weight}")
    weights = (np.asarray(brain_mask) > 0).astype(np.float32)
    if grey_matter is not None and grey_matter_weight > 0:
        grey_matter = np.asarray(grey_matter, dtype=np.float32)
        if grey_matter.shape != weights.shape:
            raise ValueError(f"grey-matter map shape {grey_matter.shape} differs from the brain mask's {weights.shape}")
        weights *= 1.0 + np.float32(grey_matter_weight) * np.clip(grey_matter, 0.0, 1.0)
    return weights


def _numpy(array) -> np.ndarray:
    """A numpy view of a numpy array or (CPU) torch tensor / MetaTensor."""
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


class PatchCentreIndicesd(MapTransform):
    """Cache lesion and hard-negative candidate centres of one volume in the data dictionary.

    Args:
        image_key: the normalised image, channel-first ``(C, X, Y, Z)``; channel 0 is used.
        label_key: the lesion mask, same shape (``> 0`` is lesion).
        brightness_factor: hard negatives are brighter than ``brightness_factor * white_matter_value``.
        white_matter_value: the white-matter intensity after normalisation (config
            ``normalization.white_matter_value``).
        margin: lesion dilation (voxels, 6-connected steps) excluded from hard negatives.
        prior_key: optional key of a ``(1, X, Y, Z)`` or ``(X, Y, Z)`` non-negative map weighting
            the hard-negative centres (e.g. cortex probability); removed from the dictionary.
        prior_floor: the least weight a bright voxel gets, in [0, 1]: with a brain mask as prior,
            the weight of the bright voxels outside the brain (0: never a centre).
        prefix: the cached keys are ``{prefix}lesion_indices``, ``{prefix}hard_negative_indices``
            and, with a prior, ``{prefix}hard_negative_cumweights``.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label",
                 brightness_factor: float = BRIGHTNESS_FACTOR, white_matter_value: float = 0.5,
                 margin: int = 2, prior_key: Optional[str] = None, prior_floor: float = 0.0, prefix: str = "centre_"):
        super().__init__((image_key, label_key))
        if brightness_factor <= 0 or white_matter_value <= 0 or margin < 0:
            raise ValueError("brightness_factor and white_matter_value must be > 0, margin >= 0")
        if not 0.0 <= prior_floor <= 1.0:
            raise ValueError(f"prior_floor must be in [0, 1], got {prior_floor}")
        self.prior_floor = float(prior_floor)
        self.image_key, self.label_key = image_key, label_key
        self.brightness_factor, self.white_matter_value = float(brightness_factor), float(white_matter_value)
        self.margin, self.prior_key, self.prefix = int(margin), prior_key, prefix

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        image = _numpy(data[self.image_key])[0]
        lesion = _numpy(data[self.label_key])[0] > 0
        if image.shape != lesion.shape:
            raise ValueError(f"image shape {image.shape} differs from label shape {lesion.shape}")
        excluded = ndimage.binary_dilation(lesion, iterations=self.margin) if self.margin and lesion.any() else lesion
        bright = (image > self.brightness_factor * self.white_matter_value) & ~excluded
        out[self.prefix + "lesion_indices"] = np.flatnonzero(lesion)
        candidates = np.flatnonzero(bright)
        if self.prior_key is not None:
            prior = _numpy(out.pop(self.prior_key)).reshape(-1)
            if prior.size != image.size:
                raise ValueError(f"prior has {prior.size} voxels, the image {image.size}")
            weights = np.maximum(prior[candidates].astype(np.float64), self.prior_floor)
            candidates = candidates[weights > 0]  # zero prior: never a centre
            out[self.prefix + "hard_negative_cumweights"] = np.cumsum(weights[weights > 0])
        out[self.prefix + "hard_negative_indices"] = candidates
        return out


class RandCropByLesionHardNegatived(Randomizable, MapTransform):
    """``num_samples`` patches centred on lesions, bright non-lesion voxels or anywhere (module docstring).

    Args:
        keys: keys cropped alike (e.g. ``("image", "label")``), channel-first, same spatial shape.
        spatial_size: patch size; every volume must be at least this large (pad first, e.g.
            ``SpatialPadd``).
        ratios: relative frequencies of the kinds (lesion, hard_negative, random), >= 0, not all 0.
        num_samples: patches per volume.
        prefix: prefix of the keys cached by :class:`PatchCentreIndicesd` (required before this).
    """

    def __init__(self, keys: Sequence[str], spatial_size: Sequence[int], ratios: Sequence[float] = (1.0, 1.0, 1.0),
                 num_samples: int = 4, prefix: str = "centre_"):
        MapTransform.__init__(self, keys)
        ratios = np.asarray(ratios, dtype=np.float64)
        if ratios.shape != (3,) or (ratios < 0).any() or ratios.sum() <= 0:
            raise ValueError(f"ratios must be three non-negative numbers (lesion, hard_negative, random), not all 0; got {ratios.tolist()}")
        if num_samples < 1 or len(spatial_size) != 3 or min(spatial_size) < 1:
            raise ValueError("num_samples must be >= 1 and spatial_size three positive sizes")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.probabilities = ratios / ratios.sum()
        self.num_samples, self.prefix = int(num_samples), prefix
        self.cached_keys = tuple(prefix + k for k in ("lesion_indices", "hard_negative_indices", "hard_negative_cumweights"))

    def randomize(self, data=None) -> None:  # choices are drawn in __call__, from self.R only
        pass

    def _draw(self, kind: str, data: dict, shape: Tuple[int, ...]) -> Tuple[str, str, int]:
        """``(actual kind, fallback reason, flat index of the drawn voxel)``."""
        if kind == "lesion":
            indices = data[self.prefix + "lesion_indices"]
            if len(indices):
                return kind, "", int(indices[self.R.randint(len(indices))])
            reason = "no lesion voxel"
        elif kind == "hard_negative":
            indices = data[self.prefix + "hard_negative_indices"]
            cumulative = data.get(self.prefix + "hard_negative_cumweights")
            if len(indices):
                if cumulative is None:
                    return kind, "", int(indices[self.R.randint(len(indices))])
                position = np.searchsorted(cumulative, self.R.uniform(0.0, cumulative[-1]), side="right")
                return kind, "", int(indices[min(int(position), len(indices) - 1)])
            reason = "no bright non-lesion voxel"
        else:
            reason = ""
        return "random", reason, int(self.R.randint(int(np.prod(shape))))

    def __call__(self, data: dict) -> List[dict]:
        for key in self.cached_keys[:2]:
            if key not in data:
                raise KeyError(f"{key!r} missing: put PatchCentreIndicesd(prefix={self.prefix!r}) before this transform")
        shape = tuple(_numpy(data[self.keys[0]]).shape[1:])
        if any(s < p for s, p in zip(shape, self.spatial_size)):
            raise ValueError(f"volume {shape} is smaller than the patch {self.spatial_size}: pad it first")
        kinds = self.R.choice(len(KINDS), size=self.num_samples, p=self.probabilities)
        others = {k: v for k, v in data.items() if k not in self.keys and k not in self.cached_keys}
        out = []
        for kind_index in kinds:
            requested = KINDS[int(kind_index)]
            kind, reason, flat = self._draw(requested, data, shape)
            voxel = tuple(int(v) for v in np.unravel_index(flat, shape))
            start = [min(max(v - p // 2, 0), s - p) for v, p, s in zip(voxel, self.spatial_size, shape)]
            box = (slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, self.spatial_size))
            patch = dict(others)
            for key in self.keys:
                patch[key] = data[key][box]
            patch.update(patch_kind=kind, patch_requested=requested, patch_fallback=reason,
                         patch_voxel=voxel, patch_start=tuple(start))
            out.append(patch)
        return out
