"""Hard-negative patch sampling (planar3d.sampling)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from planar3d.sampling import BRIGHTNESS_FACTOR, PatchCentreIndicesd, RandCropByLesionHardNegatived

PATCH = (8, 8, 6)


def _volume(seed=0):
    """White matter 0.5 with noise, one lesion (1.0, labelled), bright spots (0.9) elsewhere,
    and bright voxels touching the lesion (within the 2-voxel margin: never hard negatives)."""
    rng = np.random.default_rng(seed)
    image = (0.5 + 0.02 * rng.standard_normal((1, 40, 36, 30))).astype(np.float32)
    label = np.zeros_like(image)
    label[0, 10:14, 10:14, 10:14] = 1
    image[label > 0] = 1.0
    image[0, 14:16, 10:14, 10:14] = 0.9          # lesion border, inside the margin
    spots = rng.integers(2, 28, size=(30, 3))
    spots = spots[(np.abs(spots - 12) > 5).any(axis=1)]
    image[0, spots[:, 0], spots[:, 1], spots[:, 2]] = 0.9
    return {"image": image, "label": label, "id": "x"}


def _sample(data, seed, ratios=(1, 1, 1), num_samples=24, **kwargs):
    data = PatchCentreIndicesd("image", "label", **kwargs)(data)
    crop = RandCropByLesionHardNegatived(("image", "label"), PATCH, ratios=ratios, num_samples=num_samples)
    crop.set_random_state(seed=seed)
    return data, crop(data)


def test_hard_negative_centres_are_bright_and_outside_lesions():
    data, patches = _sample(_volume(), seed=3, ratios=(0, 1, 0), num_samples=50)
    excluded = ndimage.binary_dilation(data["label"][0] > 0, iterations=2)
    assert len(patches) == 50
    for patch in patches:
        assert patch["patch_kind"] == "hard_negative" and patch["patch_fallback"] == ""
        voxel = patch["patch_voxel"]
        assert data["image"][(0,) + voxel] > BRIGHTNESS_FACTOR * 0.5
        assert not excluded[voxel]
        start = np.array(patch["patch_start"])
        assert ((start <= voxel) & (np.array(voxel) < start + PATCH)).all()
        assert patch["image"].shape == (1,) + PATCH and patch["label"].shape == (1,) + PATCH
        np.testing.assert_array_equal(patch["image"], data["image"][(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, PATCH))])
        assert "centre_hard_negative_indices" not in patch and patch["id"] == "x"
    # the lesion-border voxels (0.9, inside the margin) were bright candidates but excluded
    assert not np.isin(np.ravel_multi_index((14, 11, 11), (40, 36, 30)), data["centre_hard_negative_indices"])


def test_lesion_patches_contain_lesion_and_kinds_follow_ratios():
    _, patches = _sample(_volume(), seed=1, ratios=(1, 0, 0), num_samples=10)
    for patch in patches:
        assert patch["patch_kind"] == "lesion" and patch["label"][(0,) + tuple(np.array(patch["patch_voxel"]) - patch["patch_start"])] == 1
    _, patches = _sample(_volume(), seed=1, ratios=(1, 2, 1), num_samples=400)
    counts = {k: sum(p["patch_kind"] == k for p in patches) for k in ("lesion", "hard_negative", "random")}
    assert sum(counts.values()) == 400
    assert 60 < counts["lesion"] < 140 and 150 < counts["hard_negative"] < 250 and 60 < counts["random"] < 140


def test_deterministic_under_a_seed():
    _, first = _sample(_volume(), seed=7)
    _, again = _sample(_volume(), seed=7)
    _, other = _sample(_volume(), seed=8)
    key = lambda ps: [(p["patch_kind"], p["patch_voxel"]) for p in ps]
    assert key(first) == key(again)
    assert key(first) != key(other)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_no_bright_voxel_falls_back_to_random_with_a_reason():
    data = _volume()
    data["image"] = np.minimum(data["image"], BRIGHTNESS_FACTOR * 0.5)  # nothing above the hard-negative threshold
    data["label"][:] = 0
    _, patches = _sample(data, seed=0, ratios=(1, 1, 0), num_samples=12)
    assert len(patches) == 12
    reasons = {p["patch_requested"]: p["patch_fallback"] for p in patches}
    assert reasons == {"lesion": "no lesion voxel", "hard_negative": "no bright non-lesion voxel"}
    assert all(p["patch_kind"] == "random" for p in patches)


def test_prior_weights_centres_and_zero_prior_excludes():
    data = _volume()
    prior = np.zeros(data["image"].shape[1:], np.float32)
    bright = np.argwhere((data["image"][0] > 0.625) & (data["label"][0] == 0))
    chosen = tuple(bright[-1])
    prior[chosen] = 0.3
    data["prior"] = prior
    cached, patches = _sample(data, seed=2, ratios=(0, 1, 0), num_samples=10, prior_key="prior")
    assert "prior" not in cached
    assert all(p["patch_voxel"] == tuple(int(v) for v in chosen) for p in patches)


def test_prior_floor_gives_bright_voxels_outside_the_prior_that_weight():
    data = _volume()
    mask = np.zeros(data["image"].shape[1:], np.float32)
    mask[:20] = 1  # a "brain" over half the volume
    plain = PatchCentreIndicesd("image", "label")(dict(data))["centre_hard_negative_indices"]
    data["prior"] = mask
    floored = PatchCentreIndicesd("image", "label", prior_key="prior", prior_floor=0.25)(dict(data))
    np.testing.assert_array_equal(floored["centre_hard_negative_indices"], plain)  # none dropped
    inside = mask.reshape(-1)[plain] > 0
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(floored["centre_hard_negative_cumweights"], np.cumsum(np.where(inside, 1.0, 0.25)))
    brain_only = PatchCentreIndicesd("image", "label", prior_key="prior")(dict(data))
    np.testing.assert_array_equal(brain_only["centre_hard_negative_indices"], plain[inside])
    with pytest.raises(ValueError, match="prior_floor"):
        PatchCentreIndicesd(prior_key="prior", prior_floor=1.5)


def test_torch_tensors_and_bad_arguments():
    data = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in _volume().items()}
    _, patches = _sample(data, seed=0, num_samples=3)
    assert all(isinstance(p["image"], torch.Tensor) and tuple(p["image"].shape) == (1,) + PATCH for p in patches)
    with pytest.raises(ValueError, match="ratios"):
        RandCropByLesionHardNegatived(("image",), PATCH, ratios=(0, 0, 0))
    with pytest.raises(KeyError, match="PatchCentreIndicesd"):
        RandCropByLesionHardNegatived(("image",), PATCH)(_volume())
    small = PatchCentreIndicesd()(_volume())
    with pytest.raises(ValueError, match="pad it first"):
        RandCropByLesionHardNegatived(("image", "label"), (64, 8, 8))(small)


def test_in_a_cached_monai_pipeline():
    """Indices are cached by CacheDataset (first transform is deterministic), the patches collate."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, EnsureTyped

    transform = Compose([
        PatchCentreIndicesd("image", "label"),
        RandCropByLesionHardNegatived(("image", "label"), PATCH, ratios=(1, 1, 1), num_samples=4),
        EnsureTyped(("image", "label"), dtype=torch.float32, track_meta=False),
    ])
    dataset = CacheDataset([_volume(0), _volume(1)], transform, progress=False)
    assert "centre_hard_negative_indices" in dataset._cache[0]

    def epoch(seed):  # as pipelines.data.make_loader: MONAI's loader reseeds the transforms from its generator
        transform.set_random_state(seed=seed)
        loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, generator=torch.Generator().manual_seed(seed))
        batches = list(loader)
        assert [tuple(b["image"].shape) for b in batches] == [(4, 1) + PATCH] * 2
        return [list(b["patch_kind"]) for b in batches], torch.cat([b["image"] for b in batches])

    kinds, images = epoch(11)
    kinds_again, images_again = epoch(11)
    assert kinds == kinds_again and torch.equal(images, images_again)


def test_hard_negative_weights_are_the_mask_weighted_towards_grey_matter():
    from planar3d.sampling import hard_negative_weights

    mask = np.array([[0, 1], [1, 1]])
    grey = np.array([[1.0, 0.0], [0.5, 2.0]])  # fractions above 1 are clipped
    assert hard_negative_weights(mask, grey, 2.0).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert hard_negative_weights(mask).tolist() == hard_negative_weights(mask, grey, 0.0).tolist() == [[0, 1], [1, 1]]
    assert hard_negative_weights(mask, None, 3.0).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        hard_negative_weights(mask, np.zeros(3), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        hard_negative_weights(mask, grey, -1.0)
