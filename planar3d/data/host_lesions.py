"""A host scan's own, unlabelled lesions: find them, to fill them with white matter or label them.

Why: the real hosts lesions are injected into are mostly scans of MS patients whose own lesions
are not labelled (four of the five in ``../shared/data/real``). Left as they are, every training
case made from such a host teaches that those real lesions are background, and the hard-negative
sampler, which centres patches on bright non-lesion voxels, seeks them out. The network is then
rewarded for telling injected lesions from real ones, the opposite of what it is for.

What: :func:`suspected_lesions` marks bright white-matter blobs of the host, and
:func:`fill_lesions` replaces them with white-matter intensity (lesion filling, as FSL's
``lesion_filling`` and LST do before tissue segmentation), so that the host looks lesion-free and
only the injected lesions are labelled lesions; nothing outside the filled voxels changes. Or
``planar3d synth --host-lesions label`` adds them to every case's label (:data:`HOST_LESION_MODES`).

The detector (parameters fixed by looking at the five real hosts, not tuned on any labelled scan;
docs/synthetic_data.md):

* the **local white-matter level**: a Gaussian-weighted mean (sigma 15 mm, so that a scanner's
  bias field is followed) of voxels that are white matter by the ICBM152 prior (>= 0.9) and
  within three spreads of the scan's white-matter level (:func:`planar3d.preprocess.white_matter_level`);
* **seeds**: brain voxels with a white-matter prior >= 0.7 and at least 1.5 times the local level
  (lesions are 1.3-2x white matter in FLAIR; cortex and septum are mostly below, and the prior
  keeps cortex out), in blobs of at least 10 mm3 (smaller ones are noise);
* **growth**: from the seeds, through brain voxels at least 1.3 times the local level within
  3 mm of a seed (millimetres, so thick slices are not grown through), so that a lesion is
  filled whole but the growth cannot run along the cortex;
* a **rim** of 1.5 mm around what was found (the lesion's partial-volume edge).

Measured on the five real hosts (docs/synthetic_data.md): the clinical hosts' large, obvious
lesions are found; small or faint lesions are missed, and they stay in the training data as
background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from planar3d.io import voxel_size
from planar3d.preprocess import white_matter_level

LOCAL_LEVEL_SIGMA_MM = 15.0
REFERENCE_PRIOR = 0.9
SEED_PRIOR = 0.7
SEED_FACTOR = 1.5
GROW_FACTOR = 1.3
GROW_MM = 3.0
RIM_MM = 1.5
MIN_LESION_MM3 = 10.0

HOST_LESION_MODES = ("keep", "fill", "label")
"""``keep``: the host as it is (its own lesions are background); ``fill``: :func:`fill_lesions`;
``label``: the host as it is, the found lesions (:attr:`SuspectedLesions.lesions`) added to every
case's label (pseudo-labels: faint lesions the finder misses stay background)."""


@dataclass(frozen=True)
class SuspectedLesions:
    """The result of :func:`suspected_lesions`.

    Attributes:
        lesions: the found lesions (bool, the host's shape).
        mask: the voxels to fill (bool, the host's shape): the found lesions and a rim of
            :data:`RIM_MM` (their partial-volume edge).
        local_level: the local white-matter level (float32, the host's shape).
        spread: the brain's white-matter spread (robust standard deviation).
        count: number of lesions found.
        volume_mm3: their volume without the rim.
    """

    lesions: np.ndarray
    mask: np.ndarray
    local_level: np.ndarray
    spread: float
    count: int
    volume_mm3: float


def local_white_matter_level(host: np.ndarray, brain: np.ndarray, white_matter_prior: np.ndarray,
                             affine: np.ndarray) -> tuple[np.ndarray, float]:
    """The white-matter level around every voxel and the brain's white-matter spread (see module docstring)."""
    level, spread = white_matter_level(host)  # as normalisation finds it, skull or not
    reference = brain & (white_matter_prior >= REFERENCE_PRIOR) & (np.abs(host - level) < 3 * max(spread, 1e-6))
    sigma = LOCAL_LEVEL_SIGMA_MM / np.asarray(voxel_size(affine))
    weighted = ndimage.gaussian_filter(np.where(reference, host, 0).astype(np.float32), sigma)
    weight = ndimage.gaussian_filter(reference.astype(np.float32), sigma)
    # Far from any reference voxel (below 0.1 % weight) the brain's own level stands in.
    local = np.where(weight > 1e-3, weighted / np.maximum(weight, 1e-3), np.float32(level))
    return local.astype(np.float32), float(spread)


def suspected_lesions(host: np.ndarray, brain: np.ndarray, white_matter_prior: np.ndarray,
                      affine: np.ndarray) -> SuspectedLesions:
    """Bright white-matter blobs of a host FLAIR: its probable own lesions (see module docstring).

    Args:
        host: the host FLAIR.
        brain: its brain mask (bool or 0/1, the host's shape).
        white_matter_prior: white-matter probability on the host's grid (e.g. the ICBM152 prior
            mapped by :func:`planar3d.data.atlas.prior_in_host`).
        affine: the host's voxel-to-world affine (for the millimetre parameters).

    Raises:
        ValueError: the three arrays do not share one shape.
    """
    host = np.asarray(host, dtype=np.float32)
    brain = np.asarray(brain) > 0
    prior = np.asarray(white_matter_prior, dtype=np.float32)
    if brain.shape != host.shape or prior.shape != host.shape:
        raise ValueError(f"host {host.shape}, brain {brain.shape} and prior {prior.shape} must share one shape")
    spacing = np.asarray(voxel_size(affine))
    local, spread = local_white_matter_level(host, brain, prior, affine)
    seeds = brain & (prior >= SEED_PRIOR) & (host >= SEED_FACTOR * local)
    seeds = _components_of_at_least(seeds, MIN_LESION_MM3 / float(np.prod(spacing)))
    bright = brain & (host >= GROW_FACTOR * local)
    if seeds.any():
        # bright voxels within GROW_MM (in mm, whatever the slice thickness) of a seed, in
        # components that hold a seed
        near = ndimage.distance_transform_edt(~seeds, sampling=spacing) <= GROW_MM
        reach, _ = ndimage.label(bright & near)
        holding_a_seed = np.setdiff1d(reach[seeds], [0])
        grown = np.isin(reach, holding_a_seed)
        count = len(holding_a_seed)  # the lesions are exactly those components: no second labelling
    else:
        grown, count = seeds, 0
    if grown.any():
        mask = brain & (ndimage.distance_transform_edt(~grown, sampling=spacing) <= RIM_MM)
    else:
        mask = grown
    return SuspectedLesions(grown, mask, local, spread, count, float(np.count_nonzero(grown) * np.prod(spacing)))


def _components_of_at_least(mask: np.ndarray, voxels: float) -> np.ndarray:
    """The connected components of ``mask`` of at least ``voxels`` voxels."""
    labels, count = ndimage.label(mask)
    if not count:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return np.isin(labels, np.flatnonzero(sizes >= voxels) + 1)


def fill_lesions(host: np.ndarray, found: SuspectedLesions, rng: np.random.Generator) -> np.ndarray:
    """The host with ``found.mask`` replaced by white matter: the local level with a smooth texture.

    The texture is Gaussian noise smoothed over one voxel, with the white-matter spread as its
    standard deviation (capped at 15 % of the level), like real white matter's grain. Voxels
    outside the mask are returned exactly as they were.
    """
    out = np.asarray(host, dtype=np.float32).copy()
    if not found.mask.any():
        return out
    where = np.argwhere(found.mask)
    lo, hi = np.maximum(where.min(0) - 2, 0), np.minimum(where.max(0) + 3, out.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    texture = ndimage.gaussian_filter(rng.standard_normal(out[box].shape).astype(np.float32), 1.0)
    texture /= max(float(texture.std()), 1e-6)
    local = found.local_level[box]
    std = np.minimum(np.float32(found.spread), np.float32(0.15) * local)
    region = found.mask[box]
    out[box] = np.where(region, np.maximum(local + std * texture, 0), out[box])
    return out
