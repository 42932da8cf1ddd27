"""Training end to end on tiny synthetic data: outputs, exact resume, input checks, CLI, DDP."""

from __future__ import annotations

import csv
import json
import os
import socket

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from planar3d.checkpoint import MODEL_FORMAT, load_model
from pipelines.cli import app
from planar3d.data.manifest import load_manifest, save_manifest
from planar3d.errors import InputError
from pipelines.config import load_config
from pipelines.train import train

TINY = [
    "network.width=0.0625", "network.norm=null", "data.patch_size=[32, 32, 16]", "data.samples_per_volume=1", "data.batch_size=2",
    "optim.epochs=2", "validation.every=1", "validation.thresholds=[0.3, 0.5]", "val_cases=1",
    "augmentation.affine_prob=0.5", "augmentation.bias_field_prob=0.5",
]


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    """Four small 3D phantoms (64x64x48, 3.3 mm), one test case per fold."""
    from planar3d.data.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 4, 0, size="small", geometries=("3d",))


def tiny_config(*extra):
    return load_config("demo_cpu", TINY + list(extra))


def test_train_writes_loadable_outputs(tiny_manifest, tmp_path):
    run = tmp_path / "run"
    best = train(tiny_manifest, 0, run, tiny_config("optim.epochs=1"), device="cpu")
    assert best == run / "best.pt" and best.is_file() and (run / "last.pt").is_file()
    raw = torch.load(best, weights_only=True)
    assert raw["format"] == MODEL_FORMAT and raw["threshold"] in (0.3, 0.5)
    assert raw["training"]["encoder_source"] == "none (random initialisation)"
    assert raw["training"]["manifest_sha256"] and raw["orientation"] == "RAS"
    assert raw["normalization"] == tiny_config().normalization.to_dict()
    assert raw["normalization"]["method"] == "white_matter_peak"  # the demo_cpu config's
    model, checkpoint = load_model(best)
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)
    last = torch.load(run / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "epoch", "best_metric"} <= set(last["resume"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1 and {"epoch", "train_loss", "val_dice", "lr", "seconds", "voxels_per_second"} <= set(rows[0])
    assert float(rows[0]["train_predicted_to_lesion"]) >= 0.0  # the patches hold lesions: a number, not NaN
    assert 0.0 <= float(rows[0]["train_predicted_fraction"]) <= 1.0
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["config"]["network"]["width"] == 0.0625
    assert {"versions", "git", "machine", "manifest", "data"} <= set(info)
    assert len(info["data"]) == 3 and all(len(d["image_sha256"]) == 64 for d in info["data"])
    assert (run / "tensorboard").is_dir()
    assert (run / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "--config cpu" not in (run / "train.log").read_text()  # a narrow network: no CPU-budget hint


def test_a_wide_network_on_the_cpu_is_pointed_to_the_cpu_config(tiny_manifest, tmp_path):
    run = tmp_path / "run"
    train(tiny_manifest, 0, run, tiny_config("optim.epochs=1", "network.width=0.5"), device="cpu")
    warnings = [line for line in (run / "train.log").read_text().splitlines() if " WARNING " in line]
    assert any("width-0.5 network on the CPU" in line and "--config cpu" in line for line in warnings)


def test_a_second_run_in_one_process_logs_to_its_own_stderr(tmp_path, monkeypatch):
    # A test runner or a notebook replaces sys.stderr between runs and may close the old one;
    # the console handler of the first run must not write to it ("I/O operation on closed file").
    import io
    import logging

    from pipelines.train_process import log, setup_logging

    # text over bytes, as click's test runner gives: flushing it once closed raises
    first, second = io.TextIOWrapper(io.BytesIO()), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging(tmp_path / "a", main=True)
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    setup_logging(tmp_path / "b", main=True)
    errors = []
    monkeypatch.setattr(logging, "raiseExceptions", True)
    monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: errors.append(record))
    log.warning("second run")
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(handler)  # later tests' logs stay out of this test's folder
        handler.close()
    assert not errors and "second run" in second.getvalue()
    assert "second run" in (tmp_path / "b" / "train.log").read_text()


@pytest.mark.parametrize(("device_type", "width", "hinted"), [
    ("cpu", 1.0, True), ("cpu", 0.5, True), ("cpu", 0.25, False), ("cpu", 0.125, False), ("cuda", 1.0, False),
])
def test_cpu_budget_hint(device_type, width, hinted):
    from pipelines.train import cpu_budget_hint

    hint = cpu_budget_hint(device_type, width)
    assert (hint is not None) == hinted
    assert hint is None or "--config cpu" in hint


@pytest.mark.parametrize("recipe", [
    [],
    # the default recipe's random parts: hard-negative sampling (brain masks from synth) and
    # scanner augmentation with every transform on
    ["data.sampling=lesion_hard_negative", "augmentation.scanner={thick_slice_prob: 1.0, blur_prob: 0.5, "
     "bias_field_prob: 0.5, histogram_prob: 0.5, gamma_prob: 0.5, noise_prob: 0.5}"],
], ids=["lesion", "recipe"])
def test_resume_is_bit_identical(tiny_manifest, tmp_path, recipe):
    config = tiny_config("network.dropout=0.2", *recipe)
    straight = train(tiny_manifest, 0, tmp_path / "a", config, device="cpu")
    train(tiny_manifest, 0, tmp_path / "b", config, device="cpu", max_epochs_this_run=1)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["training"]["epoch"] == 1
    resumed = train(tiny_manifest, 0, tmp_path / "b", config, device="cpu", resume=True)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["resume"]["history"][-1]["train_loss"] == b["resume"]["history"][-1]["train_loss"]
    assert torch.load(straight, weights_only=True)["threshold"] == torch.load(resumed, weights_only=True)["threshold"]


def test_resume_without_last_checkpoint_fails(tiny_manifest, tmp_path):
    with pytest.raises(InputError, match="no last.pt"):
        train(tiny_manifest, 0, tmp_path / "run", tiny_config(), device="cpu", resume=True)


def test_encoder_weights_from_file_are_recorded(tiny_manifest, tmp_path, vgg16_file):
    config = tiny_config("network.width=1.0", "optim.epochs=1", "val_cases=0", "encoder.freeze_epochs=-1",
                         "data.patch_size=[16, 16, 16]")
    best = train(tiny_manifest, 0, tmp_path / "run", config, device="cpu", encoder_weights=str(vgg16_file))
    source = torch.load(best, weights_only=True)["training"]["encoder_source"]
    assert source.startswith("file ") and "sha256" in source


# --- bad input: raised before the first epoch, naming the case and the problem -----------------


def _write(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _break(kind, case, tmp_path):
    """Write a broken file for ``case`` and return the field to replace and the new path."""
    image = nib.load(str(case.image))
    data = np.asarray(image.dataobj)
    if kind == "truncated":
        raw = case.image.read_bytes()
        path = tmp_path / "truncated.nii.gz"
        path.write_bytes(raw[: len(raw) // 2])
        return "image", path, "not a readable NIfTI"
    if kind == "4d":
        path = tmp_path / "four_d.nii.gz"
        _write(path, np.stack([data, data], -1).astype(np.float32), image.affine)
        return "image", path, "expected a 3D volume"
    if kind == "nan":
        path = tmp_path / "nan.nii.gz"
        bad = data.astype(np.float32)
        bad[0, 0, 0] = np.nan
        _write(path, bad, image.affine)
        return "image", path, "NaN"
    if kind == "non_binary":
        path = tmp_path / "label3.nii.gz"
        label = np.asarray(nib.load(str(case.label)).dataobj).astype(np.uint8)
        label[0, 0, 0] = 3
        _write(path, label, image.affine)
        return "label", path, "not binary"
    if kind == "grid":
        path = tmp_path / "label_grid.nii.gz"
        _write(path, np.zeros((32, 32, 24), np.uint8), image.affine)
        return "label", path, "shape"
    if kind == "missing":
        return "label", tmp_path / "nowhere.nii.gz", "file not found"
    raise AssertionError(kind)


def test_a_network_collapsed_to_background_stops_the_run(tiny_manifest, tmp_path, monkeypatch):
    import pipelines.train as train_module
    from planar3d.errors import TrainingError

    build = train_module.build_model

    def collapsed(*args, **kwargs):  # a head that can only say background, and an lr too small to change it
        model, source = build(*args, **kwargs)
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.constant_(model.head.bias, -1e3)
        return model, source

    monkeypatch.setattr(train_module, "build_model", collapsed)
    run = tmp_path / "run"
    config = tiny_config("optim.epochs=6", "optim.lr=1e-12", "optim.warmup_epochs=1", "optim.collapse_epochs=2", "loss.name=dice")
    with pytest.raises(TrainingError, match="epoch 3: the network predicted no lesion voxel in the training patches"):
        train(tiny_manifest, 0, run, config, device="cpu")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(r["train_predicted_to_lesion"]) for r in rows] == [0.0, 0.0, 0.0]  # epochs 2-3 after the warm-up
    assert [float(r["train_predicted_fraction"]) for r in rows] == [0.0, 0.0, 0.0]
    assert torch.load(run / "last.pt", weights_only=True)["resume"]["epoch"] == 3
    assert (run / "best.pt").is_file()


@pytest.mark.parametrize("ratios, warmup, patience, loss, stops", [
    ([0.0, 0.0, 0.0], 0, 3, "dice", True),
    ([1.2, 0.0, 0.0, 0.0], 1, 3, "generalized_dice", True),
    ([0.0, 0.0, 0.0], 1, 3, "dice", False),  # within the warm-up and 3 epochs after it
    ([0.0, 0.4, 0.0, 0.0], 0, 3, "dice", False),  # it predicted something in the window
    ([0.0, float("nan"), 0.0], 0, 3, "dice", False),  # an epoch without lesions says nothing
    ([0.0] * 10, 0, 0, "dice", False),  # switched off
    ([0.0, 0.0], 0, 3, "dice", False),  # fewer epochs than the patience (e.g. history from an old last.pt)
    ([0.0] * 10, 0, 3, "dice_ce", False),  # cross-entropy keeps a gradient: such runs have come back
    ([25.0] * 10, 0, 3, "dice", False),  # over-segmenting is not stopped (see check_not_collapsed)
])
def test_collapse_rule(ratios, warmup, patience, loss, stops):
    from pipelines.train import check_not_collapsed
    from pipelines.train_records import RunState
    from planar3d.errors import TrainingError

    state = RunState(epoch=len(ratios), history=[{"epoch": i + 1, "train_predicted_to_lesion": r} for i, r in enumerate(ratios)])
    config = tiny_config(f"optim.warmup_epochs={warmup}", f"optim.collapse_epochs={patience}", f"loss.name={loss}")
    if stops:
        with pytest.raises(TrainingError, match=f"for {patience} epochs in a row: it has collapsed to background"):
            check_not_collapsed(state, config)
    else:
        check_not_collapsed(state, config)


@pytest.mark.parametrize("kind", ["truncated", "4d", "nan", "non_binary", "grid", "missing", "checksum"])
def test_bad_input_is_rejected_before_training(tiny_manifest, tmp_path, kind):
    import dataclasses

    import shutil

    shutil.copytree(tiny_manifest.parent, tmp_path / "data")
    tmp_path = tmp_path / "data"
    manifest = load_manifest(tmp_path / "manifest.json")
    victim = manifest.train_cases(0)[1]
    if kind == "checksum":
        replaced = dataclasses.replace(victim, sha256={"image": "0" * 64, "label": victim.sha256["label"]})
        expected = "sha256 mismatch"
    else:
        field, path, expected = _break(kind, victim, tmp_path)
        replaced = dataclasses.replace(victim, **{field: path}, sha256={"image": None, "label": None})
    cases = [replaced if c.id == victim.id else c for c in manifest.cases]
    broken = dataclasses.replace(manifest, cases=cases)
    broken_path = tmp_path / "broken.json"
    save_manifest(broken, broken_path)
    run = tmp_path.parent / "run"
    with pytest.raises(InputError) as caught:
        train(broken_path, 0, run, tiny_config(), device="cpu")
    assert f"case {victim.id}" in str(caught.value) and expected in str(caught.value)
    assert not (run / "last.pt").exists()


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_train_with_overrides_and_check(tiny_manifest, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--manifest", str(tiny_manifest), "--fold", "1", "--out", str(run),
                                 "--config", "demo_cpu", "--check"])
    assert result.exit_code == 0, result.output
    assert "no problem found" in result.output and not (run / "last.pt").exists()
    result = runner.invoke(app, ["train", "--manifest", str(tiny_manifest), "--fold", "1", "--out", str(run),
                                 "--device", "cpu", "--encoder-weights", "none", *TINY, "optim.epochs=1"])
    assert result.exit_code == 0, result.output
    assert (run / "best.pt").is_file()
    assert json.loads((run / "run.json").read_text())["config"]["optim"]["epochs"] == 1


def test_cli_reports_config_errors(tiny_manifest, tmp_path):
    result = CliRunner().invoke(app, ["train", "--manifest", str(tiny_manifest), "--fold", "0", "--out",
                                      str(tmp_path / "run"), "optim.lr_rate=1"])
    assert result.exit_code == 1 and "lr_rate" in result.output


# --- DDP on the CPU: two gloo processes ---------------------------------------------------------


def _ddp_worker(rank, port, manifest, out, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(manifest, 0, out, load_config("demo_cpu", overrides), device="cpu")
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes(tiny_manifest, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(port, str(tiny_manifest), str(out), TINY + ["optim.epochs=1"]), nprocs=2, join=True)
    assert (out / "best.pt").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2
    load_model(out / "best.pt")


def test_slab_sampling_takes_whole_planes(tiny_manifest):
    from pipelines import data as D

    manifest = load_manifest(tiny_manifest)
    cases = manifest.train_cases(0)
    config = load_config("paper", ["data.samples_per_volume=2", "data.cache=none"])
    shapes = [D.case_shape(c) for c in cases]
    dataset = D.build_dataset(config, cases[:1], D.training_transform(config, 2, shapes), None)
    batches = list(D.patch_batches(D.make_loader(dataset, config, 0), 3))
    assert [tuple(b[0].shape) for b in batches] == [(2, 1, 64, 64, 16)]
    assert set(torch.unique(batches[0][1]).tolist()) <= {0.0, 1.0}


def test_encoder_weights_accept_the_file_planar3d_inflate_writes(tmp_path, vgg16_file, vgg16_state):
    from planar3d.errors import ConfigError
    from planar3d.inflate import encoder_state_from_source, write_encoder_checkpoint
    from planar3d.networks import PlanarResUNetConfig
    from pipelines.train import encoder_weights_for

    write_encoder_checkpoint(vgg16_file, tmp_path / "encoder.pt", plane_axis=0)
    state, source = encoder_weights_for(PlanarResUNetConfig(plane_axis=0), tmp_path / "encoder.pt")
    expected, _ = encoder_state_from_source(vgg16_file, plane_axis=0)  # stem folded for the default normalisation
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert "encoder.pt" in source and "vgg16_test.pth" in source
    direct, _ = encoder_weights_for(PlanarResUNetConfig(plane_axis=0), vgg16_file)  # a VGG-16 file still works
    assert all(torch.equal(direct[k], expected[k]) for k in expected)
    with pytest.raises(ConfigError, match=r"encoder\.pt: .*plane_axis 0 \(the network needs 2\)"):
        encoder_weights_for(PlanarResUNetConfig(plane_axis=2), tmp_path / "encoder.pt")
