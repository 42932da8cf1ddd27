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


def test_training_with_the_device_loader_resumes_bit_identically(tmp_path):
    from planar3d.data.synth import write_synthetic_dataset
    from pipelines.train import train

    manifest = write_synthetic_dataset(tmp_path / "data", 3, 0, size="small", geometries=("3d",))
    config = load_config("tiny", ["data.loader=device", "data.cache=disk", "data.patch_size=[16, 16, 8]", "network.norm=null",
                                  "data.samples_per_volume=1", "data.batch_size=2", "optim.epochs=2", "validation.every=100", "val_cases=0",
                                  *ALL_AUG])
    train(manifest, 0, tmp_path / "a", config, device="cpu")
    train(manifest, 0, tmp_path / "b", config, device="cpu", max_epochs_this_run=1)
    train(manifest, 0, tmp_path / "b", config, device="cpu", resume=True)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items())
    assert a["resume"]["history"][-1]["train_loss"] == b["resume"]["history"][-1]["train_loss"]
    assert len(list((tmp_path / "b" / "cache" / "device").glob("*.pt"))) == 2  # persistent cache of the 2 training cases
