"""Patches cut and augmented on the training device (planar3d.patches, pipelines.device_batches), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planar3d import patches as P
from planar3d.errors import ConfigError
from pipelines.config import load_config
from pipelines.device_batches import DevicePatchLoader, check_device_loader_config

NO_AUG = ["augmentation.flip_prob=0", "augmentation.affine_prob=0", "augmentation.gamma_prob=0",
          "augmentation.bias_field_prob=0", "augmentation.noise_prob=0"]
ALL_AUG = ["augmentation.flip_prob=0.5", "augmentation.affine_prob=0.5", "augmentation.gamma_prob=0.5",
           "augmentation.bias_field_prob=0.5", "augmentation.noise_prob=0.5"]
# the issue-9 recipe's sampling and scanner augmentation, every scanner transform at 0.5
RECIPE = ["data.sampling=lesion_hard_negative", "data.ratios=[1, 1, 1]",
          "augmentation.scanner={thick_slice_prob: 0.5, blur_prob: 0.5, bias_field_prob: 0.5, histogram_prob: 0.5, "
          "gamma_prob: 0.5, noise_prob: 0.5}"]


def _volumes(count=3, shape=(24, 20, 10)):
    out = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        image = torch.rand((1, *shape), generator=generator)
        label = torch.zeros((1, *shape), dtype=torch.uint8)
        label[0, 8 + seed:12 + seed, 6:10, 3:6] = 1
        out.append((image, label))
    return out


def _config(*extra):
    return load_config("tiny", ["data.loader=device", "data.patch_size=[8, 8, 4]", "data.samples_per_volume=3",
                                "data.batch_size=4", "data.pos_neg_ratio=1.0", *extra])


# --- kernels -------------------------------------------------------------------------------------


def test_nth_background_skips_exactly_the_lesions():
    mask = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.2
    lesions = torch.nonzero(mask).reshape(-1)
    background = torch.nonzero(~mask).reshape(-1).tolist()
    ranks = P.background_ranks(lesions)
    assert [P.nth_background(n, lesions, ranks) for n in range(len(background))] == background


def test_padding_and_bias_field_and_gamma_match_monai():
    from monai.transforms import AdjustContrast, RandBiasField, SpatialPad

    volume = torch.rand((1, 5, 8, 3), generator=torch.Generator().manual_seed(1))
    expected = SpatialPad((8, 8, 6), mode="edge")(volume)
    assert torch.equal(P.pad_symmetric(volume, (8, 8, 6)), torch.as_tensor(expected))
    coefficients = torch.linspace(-0.3, 0.3, len(P.bias_field_terms()))
    field = RandBiasField()._generate_random_field((6, 7, 5), 3, coefficients.tolist())
    np.testing.assert_allclose(P.bias_fields(P.bias_field_matrices(coefficients[None]), P.legendre_bases((6, 7, 5)))[0].numpy(), np.exp(field), rtol=1e-5)
    reference = AdjustContrast(1.3, retain_stats=True)(volume)
    torch.testing.assert_close(P.adjust_gamma(volume, 1.3), torch.as_tensor(reference), rtol=1e-5, atol=1e-5)


def test_affine_is_identity_at_zero_and_a_quarter_turn_in_the_plane():
    generator = torch.Generator().manual_seed(2)
    image = torch.rand((1, 1, 6, 6, 3), generator=generator)
    label = (image > 0.5).float()
    same = P.in_plane_theta(0.0, (1, 1, 1), plane_axis=2, size=(6, 6, 3))
    moved, moved_label = P.affine_resample(image, label, same[None])
    torch.testing.assert_close(moved, image)
    assert torch.equal(moved_label, label)
    quarter = P.in_plane_theta(np.pi / 2, (1, 1, 1), plane_axis=2, size=(6, 6, 3))
    _, turned = P.affine_resample(image, label, quarter[None])
    assert any(torch.equal(turned, torch.rot90(label, k, (2, 3))) for k in (1, 3))


# --- the loader ----------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_epoch_rank_and_step():
    config = _config(*ALL_AUG)
    loader = DevicePatchLoader(_volumes(), config, plane_axis=2, device=torch.device("cpu"))
    first = list(loader.epoch_batches(0))
    assert [tuple(image.shape) for image, _ in first] == [(4, 1, 8, 8, 4), (4, 1, 8, 8, 4), (1, 1, 8, 8, 4)]
    later = list(loader.epoch_batches(1))
    fresh = DevicePatchLoader(_volumes(), config, plane_axis=2, device=torch.device("cpu"))
    # a new loader (a resumed run) starting at epoch 1 gives exactly the epoch-1 batches
    for (a, b), (c, d) in zip(later, fresh.epoch_batches(1)):
        assert torch.equal(a, c) and torch.equal(b, d)
    for (a, b), (c, d) in zip(first, fresh.epoch_batches(0)):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(first[0][0], later[0][0])
    other = DevicePatchLoader(_volumes(), _config(*ALL_AUG, "seed=1"), plane_axis=2, device=torch.device("cpu"))
    assert not torch.equal(next(other.epoch_batches(0))[0], first[0][0])


def test_ranks_share_the_volumes_of_an_epoch_like_distributed_sampler():
    loader = DevicePatchLoader(_volumes(3), _config(), plane_axis=2, device=torch.device("cpu"))
    whole = loader.epoch_volumes(4)
    assert sorted(whole) == [0, 1, 2]
    shards = [loader.epoch_volumes(4, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2 and set(shards[0] + shards[1]) == {0, 1, 2}


def test_patches_are_lesion_centred_at_the_configured_ratio():
    config = _config(*NO_AUG, "data.pos_neg_ratio=3.0", "data.samples_per_volume=100", "data.batch_size=50")
    loader = DevicePatchLoader(_volumes(2), config, plane_axis=2, device=torch.device("cpu"))
    centres = [label[:, 0, 4, 4, 2] for _, label in loader.epoch_batches(0)]  # the drawn voxel: lesions lie >= half a patch from the border
    share = float(torch.cat(centres).mean())
    assert 0.68 < share < 0.82  # 0.75 expected; background centres are never lesion
    images = torch.cat([image for image, _ in loader.epoch_batches(0)])
    assert images.shape == (200, 1, 8, 8, 4)


def test_augmentation_keeps_image_and_label_aligned():
    volumes = []
    for image, label in _volumes(2):
        volumes.append((label.float() + 0.001 * image, label))  # image = label, slightly textured
    flips = DevicePatchLoader(volumes, _config(*NO_AUG, "augmentation.flip_prob=0.5"), 2, torch.device("cpu"))
    flipped = 0
    for image, label in flips.epoch_batches(0):
        assert torch.equal(image.round(), label)
        flipped += 1
    affine = DevicePatchLoader(volumes, _config(*NO_AUG, "augmentation.affine_prob=1.0", "augmentation.rotate_degrees=30",
                                                "data.samples_per_volume=20"), 2, torch.device("cpu"))
    agree = [float(((image > 0.5).float() == label).float().mean()) for image, label in affine.epoch_batches(0)]
    assert min(agree) > 0.9  # bilinear image and nearest label differ only on lesion borders
    assert flipped > 0


def test_slabs_take_whole_padded_planes_and_an_unknown_sampling_is_refused():
    config = load_config("paper", ["data.loader=device", "data.samples_per_volume=2"])
    volumes = _volumes(1, (24, 20, 10)) + _volumes(1, (20, 22, 10))
    loader = DevicePatchLoader(volumes, config, plane_axis=2, device=torch.device("cpu"))
    batches = list(loader.epoch_batches(0))  # 2 volumes x 2 slabs in steps of 3 (the paper's batch)
    assert [tuple(image.shape) for image, _ in batches] == [(3, 1, 24, 22, 16), (1, 1, 24, 22, 16)]
    assert set(torch.unique(batches[0][1]).tolist()) <= {0.0, 1.0}
    unsupported = config.model_copy(update={"data": config.data.model_copy(update={"sampling": "grid"})})
    with pytest.raises(ConfigError, match="data.sampling=grid"):
        check_device_loader_config(unsupported)


@pytest.mark.parametrize("recipe", [[], RECIPE], ids=["lesion", "recipe"])
def test_training_with_the_device_loader_resumes_bit_identically(tmp_path, recipe):
    from planar3d.data.synth import write_synthetic_dataset
    from pipelines.train import train

    manifest = write_synthetic_dataset(tmp_path / "data", 3, 0, size="small", geometries=("3d",))
    config = load_config("tiny", ["data.loader=device", "data.cache=disk", "data.patch_size=[16, 16, 8]", "network.norm=null",
                                  "data.samples_per_volume=1", "data.batch_size=2", "optim.epochs=2", "validation.every=100", "val_cases=0",
                                  *ALL_AUG, *recipe])
    train(manifest, 0, tmp_path / "a", config, device="cpu")
    train(manifest, 0, tmp_path / "b", config, device="cpu", max_epochs_this_run=1)
    train(manifest, 0, tmp_path / "b", config, device="cpu", resume=True)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items())
    assert a["resume"]["history"][-1]["train_loss"] == b["resume"]["history"][-1]["train_loss"]
    assert len(list((tmp_path / "b" / "cache" / "device").glob("*.pt"))) == 2  # persistent cache of the 2 training cases
    import json

    assert json.loads((tmp_path / "a" / "run.json").read_text())["loader"] == "device"


# --- the issue-9 recipe on the device: hard negatives and scanner augmentation ------------------

def _scanner_only(**probs):
    values = {"thick_slice_prob": 0, "blur_prob": 0, "bias_field_prob": 0, "histogram_prob": 0, "gamma_prob": 0,
              "noise_prob": 0, **probs}
    return "augmentation.scanner={" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}"


def _bright_volumes(config, count=2, shape=(24, 20, 10)):
    """Images below the hard-negative threshold except bright spots; a lesion in each; brain-mask priors."""
    from pipelines.data import hard_negative_threshold

    threshold = hard_negative_threshold(config)
    volumes, priors = [], []
    for seed in range(count):
        generator = torch.Generator().manual_seed(10 + seed)
        image = torch.rand((1, *shape), generator=generator) * 0.5 * threshold
        image[0, 2:6, 3:5, 2:4] = 2 * threshold          # bright, far from the lesion
        image[0, 18:21, 14:17, 6:8] = 2 * threshold
        label = torch.zeros((1, *shape), dtype=torch.uint8)
        label[0, 10:13, 8:11, 4:6] = 1
        image[label.bool()] = 2 * threshold              # lesions are bright too, never hard negatives
        prior = torch.ones((1, *shape))
        prior[0, 15:] = 0                                 # outside the "brain": never a centre
        volumes.append((image, label))
        priors.append(prior)
    return volumes, priors


def test_hard_negative_candidates_are_the_monai_loaders():
    from pipelines.data import sampling_transforms

    config = _config(*NO_AUG, "data.sampling=lesion_hard_negative", "data.patch_size=[8, 8, 16]")
    volumes, priors = _bright_volumes(config)
    loader = DevicePatchLoader(volumes, config, 2, torch.device("cpu"), priors=priors)
    chain = sampling_transforms(config, 2, [tuple(v[0].shape[1:]) for v in volumes])[:-1]  # pads + PatchCentreIndicesd
    assert type(chain[-1]).__name__ == "PatchCentreIndicesd"
    for volume, (image, label), prior in zip(loader.volumes, volumes, priors):
        data = {"image": image.clone(), "label": label.float(), "brain_mask": prior.clone()}
        for transform in chain:
            data = transform(data)
        assert len(volume.hard_negatives) > 0
        np.testing.assert_array_equal(volume.hard_negatives, data["centre_hard_negative_indices"])
        np.testing.assert_array_equal(volume.cumweights, data["centre_hard_negative_cumweights"])
        assert volume.image.shape[1:] == data["image"].shape[1:]  # padded alike (z: 10 -> 16)


def test_hard_negative_centres_are_candidates_and_kinds_follow_the_ratios():
    config = _config(*NO_AUG, "data.sampling=lesion_hard_negative", "data.ratios=[1, 2, 1]",
                     "data.samples_per_volume=200", "data.batch_size=50")
    volumes, priors = _bright_volumes(config)
    loader = DevicePatchLoader(volumes, config, 2, torch.device("cpu"), priors=priors)
    choices = []
    for image, label in loader.epoch_batches(0):
        for i, choice in enumerate(loader.last_choices):
            volume = loader.volumes[choice.volume]
            flat = int(np.ravel_multi_index(choice.voxel, volume.image.shape[1:]))
            inside = tuple(v - s for v, s in zip(choice.voxel, choice.start))
            assert all(0 <= v < p for v, p in zip(inside, loader.patch_size))  # the drawn voxel is in its patch
            if choice.kind == "hard_negative":
                assert flat in set(volume.hard_negatives.tolist()) and choice.voxel[0] < 15  # zero prior: never
                assert float(image[i, 0][inside]) == float(volume.image[0][choice.voxel]) > 0
            if choice.kind == "lesion":
                assert float(label[i, 0][inside]) == 1.0
        choices += loader.last_choices
    shares = {k: sum(c.kind == k for c in choices) / len(choices) for k in ("lesion", "hard_negative", "random")}
    assert abs(shares["lesion"] - 0.25) < 0.05 and abs(shares["hard_negative"] - 0.5) < 0.05
    assert abs(shares["random"] - 0.25) < 0.05
    assert not loader.fallback_counts and sum(loader.kind_counts.values()) == 400


def test_hard_negatives_follow_the_prior_weights():
    config = _config(*NO_AUG, "data.sampling=lesion_hard_negative", "data.ratios=[0, 1, 0]",
                     "data.samples_per_volume=400", "data.batch_size=100")
    volumes, priors = _bright_volumes(config, count=1)
    priors[0][0, :8] = 3.0  # the spot at x 2:6 weighs 3 per voxel, the one at x 18:21 is outside (0)
    priors[0][0, 8:15] = 1.0
    image = volumes[0][0]
    image[0, 9:13, 16:18, 2:4] = image.max()  # a second spot of 16 voxels at weight 1 (the first: 16 at weight 3)
    loader = DevicePatchLoader(volumes, config, 2, torch.device("cpu"), priors=priors)
    heavy = 0
    for _ in loader.epoch_batches(0):
        heavy += sum(c.voxel[0] < 8 for c in loader.last_choices)
    assert abs(heavy / 400 - 0.75) < 0.05  # 16 x 3 of 16 x 3 + 16 x 1


def test_a_kind_without_candidates_falls_back_to_a_random_patch_and_is_counted():
    config = _config(*NO_AUG, "data.sampling=lesion_hard_negative", "data.ratios=[1, 1, 0]", "data.samples_per_volume=20")
    dull = [(torch.zeros((1, 24, 20, 10)), torch.zeros((1, 24, 20, 10), dtype=torch.uint8))]
    loader = DevicePatchLoader(dull, config, 2, torch.device("cpu"))
    list(loader.epoch_batches(0))
    assert loader.kind_counts == {"random": 20}
    assert set(loader.fallback_counts) <= {("lesion", "no lesion voxel"), ("hard_negative", "no bright non-lesion voxel")}
    assert sum(loader.fallback_counts.values()) == 20 and len(loader.fallback_counts) == 2


def test_gaussian_blur_and_histogram_shift_match_monai():
    from monai.transforms import GaussianSmooth, RandHistogramShift

    image = torch.rand((1, 9, 8, 7), generator=torch.Generator().manual_seed(3)) * 3 - 1
    sigmas = (0.3, 0.7, 1.0)
    torch.testing.assert_close(P.gaussian_blur(image, P.gaussian_kernels(sigmas)), torch.as_tensor(GaussianSmooth(sigmas)(image)),
                               rtol=1e-6, atol=1e-6)
    uniforms = [0.3, 0.9, 0.1, 0.5, 0.7]

    class SameNumbers:  # MONAI's randomize() fed the device loader's uniform numbers
        def __init__(self):
            self.left = iter(uniforms)

        def rand(self):
            return 0.0

        def randint(self, low, high):
            return 7

        def uniform(self, low, high):
            return low + (high - low) * next(self.left)

    shift = RandHistogramShift(num_control_points=(5, 10), prob=1.0)
    shift.R = SameNumbers()
    expected = shift(image)
    reference, floating = P.histogram_control_points(7, uniforms)
    np.testing.assert_array_equal(floating.numpy(), shift.floating_control_points)
    np.testing.assert_array_equal(reference.numpy(), shift.reference_control_points)
    torch.testing.assert_close(P.histogram_shift(image, reference.float(), floating.float()), torch.as_tensor(expected),
                               rtol=1e-5, atol=1e-6)
    assert bool((floating[1:] >= floating[:-1]).all())  # monotone
    # FiniteRandHistogramShiftd's guard: a constant patch (0/0 slopes) comes back unchanged
    flat = torch.full((1, 4, 4, 4), 0.7)
    assert torch.equal(P.histogram_shift(flat, reference.float(), floating.float()), flat)


def test_thick_slices_on_the_device_are_simulate_thick_slices_capped_by_the_spacing():
    from planar3d.augment import capped_thickness_factor, simulate_thick_slices
    from pipelines import device_batches as DB

    plain = _config(*NO_AUG, "data.patch_size=[8, 8, 10]")
    thick = _config(*NO_AUG, "data.patch_size=[8, 8, 10]", _scanner_only(thick_slice_prob=1.0))
    volumes = _volumes(2)
    for spacing, changes in (((1.0, 1.0, 1.0), True), ((1.0, 1.0, 2.5), True), ((1.0, 1.0, 5.0), False)):
        spacings = [spacing] * 2
        seed = 1234
        before, _ = DevicePatchLoader(volumes, plain, 2, torch.device("cpu"), spacings=spacings).batch([0, 1], seed)
        after, _ = DevicePatchLoader(volumes, thick, 2, torch.device("cpu"), spacings=spacings).batch([0, 1], seed)
        generator = torch.Generator().manual_seed(seed)
        torch.rand((2, DB._DRAWS), generator=generator, dtype=torch.float64)
        rows = torch.rand((2, DB._HIST_POINTS + 8), generator=generator, dtype=torch.float64).tolist()
        for i in range(2):
            factor = capped_thickness_factor(2.0 + 3.0 * rows[i][DB._THICK_FACTOR], spacing[2], 6.0)
            assert (factor is not None) == changes
            expected = simulate_thick_slices(before[i], 2, factor) if changes else before[i]
            assert torch.equal(after[i], expected)


@pytest.mark.parametrize("name", ["thick_slice_prob", "blur_prob", "bias_field_prob", "histogram_prob", "gamma_prob",
                                  "noise_prob"])
def test_each_scanner_transform_is_applied_with_its_probability(name):
    plain = _config(*NO_AUG, "data.samples_per_volume=100", "data.batch_size=50")
    chosen = _config(*NO_AUG, "data.samples_per_volume=100", "data.batch_size=50", _scanner_only(**{name: 0.3}))
    volumes = _volumes(2)
    a = torch.cat([image for image, _ in DevicePatchLoader(volumes, plain, 2, torch.device("cpu")).epoch_batches(0)])
    b = torch.cat([image for image, _ in DevicePatchLoader(volumes, chosen, 2, torch.device("cpu")).epoch_batches(0)])
    changed = (a != b).flatten(1).any(1).float().mean().item()
    assert 0.2 < changed < 0.4  # 0.3 expected over 200 patches
    assert torch.isfinite(b).all()


def test_recipe_batches_are_a_function_of_seed_epoch_rank_and_step():
    config = _config(*ALL_AUG, *RECIPE)
    volumes, priors = _bright_volumes(config, count=3)
    make = lambda cfg: DevicePatchLoader(volumes, cfg, 2, torch.device("cpu"), priors=priors,
                                         spacings=[(1.0, 1.0, 1.0)] * 3)
    loader = make(config)
    first = list(loader.epoch_batches(0))
    later = list(loader.epoch_batches(1))
    fresh = make(config)
    for (a, b), (c, d) in zip(later, fresh.epoch_batches(1)):
        assert torch.equal(a, c) and torch.equal(b, d)
    for (a, b), (c, d) in zip(first, fresh.epoch_batches(0)):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert all(torch.isfinite(image).all() for image, _ in first + later)
    # the sampling stream does not depend on the scanner draws: the same patches without them
    bare = make(_config(*ALL_AUG, *RECIPE[:2]))
    list(bare.epoch_batches(0))
    list(loader.epoch_batches(0))
    assert [(c.volume, c.voxel) for c in bare.last_choices] == [(c.volume, c.voxel) for c in loader.last_choices]
