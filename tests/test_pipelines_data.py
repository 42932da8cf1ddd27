"""Training data (pipelines.data): the preprocessing prediction uses, geometry, reproducible loaders."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pipelines.config import load_config
from pipelines.data import (LoadPreprocessd, build_dataset, load_validation_volumes, make_loader, patch_batches,
                            resolve_geometry, split_validation, training_transform)
from pipelines.predict import InferenceSettings, ScanInput, prepare_scan
from planar3d.checkpoint import ModelCheckpoint
from planar3d.data.manifest import Case
from planar3d.errors import InputError
from planar3d.networks import PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig, load_preprocessed


def _case(folder, name, affine, shape=(12, 10, 6), seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.normal(40, 8, shape) + (rng.random(shape) > 0.3) * rng.normal(300, 30, shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:6, 2:5, 1:3] = 1
    nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_label.nii.gz")
    return Case(name, folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz")


LPS_THICK = np.diag([-0.9, -0.9, 3.0, 1.0])


@pytest.fixture
def cases(tmp_path):
    return [_case(tmp_path, f"c{i}", LPS_THICK, seed=i) for i in range(3)]


def test_training_and_prediction_see_the_same_volume(cases):
    normalization = NormalizationConfig(method="white_matter_peak")
    item = LoadPreprocessd(normalization=normalization)({"image": str(cases[0].image), "label": str(cases[0].label)})
    settings = InferenceSettings.from_checkpoint(ModelCheckpoint({}, PlanarResUNetConfig(), normalization))
    prepared = prepare_scan(ScanInput(cases[0].image, cases[0].image.name), settings)
    assert item["image"].shape == (1, *prepared.volume.shape) and item["image"].dtype == torch.float32
    np.testing.assert_array_equal(item["image"][0].numpy(), prepared.volume)
    # the label went through the same reorientation: LPS -> RAS flips the first two axes
    label = np.asarray(nib.load(cases[0].label).dataobj)[::-1, ::-1] > 0
    np.testing.assert_array_equal(item["label"][0].numpy(), label.astype(np.float32))
    (case_id, volume, mask, spacing), = load_validation_volumes(cases[:1], normalization)
    assert case_id == "c0" and mask.dtype == bool
    np.testing.assert_array_equal(volume, prepared.volume)
    np.testing.assert_array_equal(mask, label)


def test_load_preprocessed_refuses_constant_scans_and_mismatched_labels(tmp_path, cases):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match=r"flat\.nii\.gz: the volume is constant"):
        load_preprocessed(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "small_label.nii.gz")
    with pytest.raises(InputError, match=r"small_label\.nii\.gz: label shape"):
        load_preprocessed(cases[0].image, label=tmp_path / "small_label.nii.gz")
    scan = load_preprocessed(cases[0].image, keep_raw=True)
    assert scan.raw.shape == scan.volume.shape and set(scan.seconds) == {"load", "preprocess"}


def test_geometry_is_resolved_from_the_first_case(cases):
    config = load_config("tiny")
    axis, pools = resolve_geometry(load_config("tiny", ["network.plane_axis=auto", "network.pool_across_planes=auto"]), cases)
    assert axis == 2 and pools == (False, False, True, True)  # 3 mm slices along the last RAS axis
    resolved = config.network.resolve(axis, pools)
    assert isinstance(resolved, PlanarResUNetConfig) and type(resolved) is PlanarResUNetConfig
    assert resolved.plane_axis == (2 if config.network.plane_axis == "auto" else config.network.plane_axis)


def test_split_validation_keeps_one_case_to_train(cases):
    train, validation = split_validation(cases, 5, seed=0)
    assert len(train) == 1 and len(validation) == 2
    assert split_validation(cases, 1, seed=3) == split_validation(cases, 1, seed=3)


def test_loader_patches_depend_only_on_seed_and_epoch(cases, tmp_path):
    config = load_config("tiny", ["data.cache=none", "data.patch_size=[8, 8, 4]", "data.samples_per_volume=2",
                                  "data.batch_size=3"])
    transform = training_transform(config, 2, [(12, 10, 6)] * 3)
    dataset = build_dataset(config, cases, transform, tmp_path)

    def patches(epoch):
        return [(image.clone(), label.clone()) for image, label in patch_batches(make_loader(dataset, config, epoch), 3)]

    first, again, other = patches(0), patches(0), patches(1)
    assert [image.shape[0] for image, _ in first] == [3, 3]  # 3 volumes x 2 patches in steps of 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
