"""Hostile and broken input: every reader refuses each bad file by name, batches always finish.

Every bad file is built here, byte by byte where nibabel would refuse to write it (a NaN voxel
spacing, a header claiming 4 GiB in a 1 KB file, RGB24, complex64...). The same table of bad
files goes through every reader: :func:`planar3d.io.load_image`, ``predict`` (batch), ``evaluate``,
``manifest check`` and the training data checks. The rest covers what surrounds a batch: output
collisions, unwritable or ambiguous output folders, a full disk, claims shared by concurrent
workers (also real concurrent processes), leftover temporary files, file names with control
characters, manifest symlinks, malicious pickles on every checkpoint load path, ``kill -9``.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.predict import InferenceSettings, ScanInput, find_inputs, predict_folder, predict_with_model
from planar3d.claims import ScanClaims
from pipelines.cli import app
from planar3d.errors import InputError, WeightsError
from planar3d.io import (
    check_output_folder, display_path, host_name, json_safe, load_image, read_volume, remove_stale_temporaries, write_json,
)
from planar3d.naming import output_collisions
from planar3d.preprocess import NormalizationConfig, normalize_intensity
from tests.conftest import PROJECT_ROOT
from tests.test_predict_geometry import META, ThresholdModel, _expected

SHAPE = (12, 10, 8)


# --- building bad files -------------------------------------------------------------------------


def _good_data(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """A bright noisy block in a dark noisy box (int16): a head for the intensity normalisation."""
    rng = np.random.default_rng(seed)
    data = rng.normal(20, 5, shape)
    data[2:-2, 2:-2, 1:-1] += rng.normal(400, 120, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
    return np.clip(data, 0, None).astype(np.int16)


def _nifti_bytes(data: np.ndarray, affine=None, **fields) -> bytes:
    """Uncompressed single-file NIfTI bytes with header ``fields`` overwritten after nibabel's checks."""
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    raw = bytearray(image.to_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    for key, value in fields.items():
        header[key] = value
    raw[:348] = header.binaryblock
    return bytes(raw)


def _write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _pixdim(index: int, value: float) -> np.ndarray:
    pixdim = np.array([1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0], np.float32)
    pixdim[index] = value
    return pixdim


def _dims(*shape) -> np.ndarray:
    dims = np.ones(8, np.int16)
    dims[0] = len(shape)
    dims[1:1 + len(shape)] = shape
    return dims


def _rgb() -> bytes:
    data = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


def _nan_voxel() -> bytes:
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    data[2, 3, 4] = np.nan
    return _nifti_bytes(data)


def _singular_affine() -> bytes:
    return _nifti_bytes(_good_data(), srow_z=np.zeros(4, np.float32), sform_code=2)


def _truncated_gz(path: Path) -> Path:
    raw = gzip.compress(_nifti_bytes(np.ones((30, 30, 30), np.float32)))
    path.write_bytes(raw[: len(raw) // 2])
    return path


# name -> (writer of the bad file at that path, words the refusal must contain)
BAD_FILES = {
    "nan_spacing.nii.gz": (lambda p: _write(p, _nifti_bytes(_good_data(), pixdim=_pixdim(1, np.nan))), "spacing"),
    "inf_spacing.nii": (lambda p: _write(p, _nifti_bytes(_good_data(), pixdim=_pixdim(2, np.inf))), "spacing"),
    "zero_spacing.nii.gz": (lambda p: _write(p, _nifti_bytes(_good_data(), pixdim=_pixdim(3, 0.0))), "spacing"),
    "negative_spacing.nii.gz": (lambda p: _write(p, _nifti_bytes(_good_data(), pixdim=_pixdim(1, -1.0))), "spacing"),
    "singular_affine.nii.gz": (lambda p: _write(p, _singular_affine()), "degenerate"),
    "huge_claim.nii": (lambda p: _write(p, _nifti_bytes(np.zeros((4, 4, 4), np.float32), dim=_dims(1024, 1024, 1024))), "over the limit"),
    "huge_claim_gz.nii.gz": (lambda p: _write(p, _nifti_bytes(np.zeros((4, 4, 4), np.float32), dim=_dims(1024, 1024, 1024))), "over the limit"),
    "claims_more_than_file.nii": (lambda p: _write(p, _nifti_bytes(np.zeros((4, 4, 4), np.float32), dim=_dims(100, 100, 100))), "truncated"),
    "rgb24.nii.gz": (lambda p: _write(p, _rgb()), "unsupported data type RGB"),
    "complex64.nii.gz": (lambda p: _write(p, _nifti_bytes(np.ones(SHAPE, np.complex64))), "unsupported data type complex64"),
    "zero_size.nii": (lambda p: _write(p, _nifti_bytes(np.zeros((4, 4, 4), np.float32), dim=_dims(0, 4, 4))), "no voxels"),
    "five_d.nii.gz": (lambda p: _write(p, _nifti_bytes(np.ones((6, 6, 6, 2, 2), np.float32))), "3D"),
    "four_d.nii.gz": (lambda p: _write(p, _nifti_bytes(np.ones((6, 6, 6, 2), np.float32))), "3D"),
    "empty_file.nii.gz": (lambda p: _write(p, b""), "not a readable"),
    "truncated.nii.gz": (_truncated_gz, "not a readable"),
    "nan_voxel.nii.gz": (lambda p: _write(p, _nan_voxel()), "NaN"),
}


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, (writer, _) in BAD_FILES.items():
        writer(folder / name)
    return folder


# --- every reader -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_image_refuses_by_name(bad_folder, name):
    with pytest.raises(InputError) as caught:
        read_volume(bad_folder / name)
    message = str(caught.value)
    assert name in message and BAD_FILES[name][1] in message, message
    assert "\n" not in message


def test_huge_claims_are_refused_before_any_allocation(bad_folder):
    """A 4 GiB claim in a 1 KB file: refused on the header, whatever the size limit."""
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="over the limit"):
            load_image(bad_folder / "huge_claim_gz.nii.gz")
        with pytest.raises(InputError, match="truncated: the header claims"):  # limit raised: the file size refuses it
            load_image(bad_folder / "huge_claim.nii", max_image_bytes=8 * 1024 ** 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 ** 2
    assert (bad_folder / "huge_claim.nii").stat().st_size < 2048


def test_size_limit_is_configurable(tmp_path):
    path = _write(tmp_path / "scan.nii.gz", _nifti_bytes(_good_data()))
    size = int(np.prod(SHAPE)) * 2
    assert load_image(path, max_image_bytes=size).shape == SHAPE
    with pytest.raises(InputError, match="over the limit"):
        load_image(path, max_image_bytes=size - 1)


def _scan_folder(tmp_path: Path, bad_folder: Path, goods=3) -> Path:
    """Good scans, every bad file, and a good scan whose name holds a newline."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in BAD_FILES:
        (folder / name).write_bytes((bad_folder / name).read_bytes())
    for index in range(goods):
        _write(folder / f"good{index}.nii.gz", _nifti_bytes(_good_data(index)))
    _write(folder / "evil\nerror: forged.nii.gz", _nifti_bytes(_good_data(7)))
    return folder


def test_predict_batch_with_every_bad_file(tmp_path, bad_folder, monkeypatch):
    """Good masks exact, every bad file a named failure, an unexpected exception contained."""
    import pipelines.predict_batch as batch  # predict_with_model looks run_model up there

    folder = _scan_folder(tmp_path, bad_folder)
    (folder / "bug.nii.gz").write_bytes((folder / "good0.nii.gz").read_bytes())
    original = batch.run_model

    def run_model(model, prepared, settings, *args, **kwargs):  # a bug (not an InputError) on one scan only
        if prepared.scan.path.name == "bug.nii.gz":
            raise TypeError("unexpected bug")
        return original(model, prepared, settings, *args, **kwargs)

    monkeypatch.setattr(batch, "run_model", run_model)
    out = tmp_path / "out"
    scans = find_inputs(folder)
    settings = InferenceSettings.from_checkpoint(META, min_lesion_size=0)
    summary = predict_with_model(ThresholdModel(), META, scans, out, settings, progress=False)
    status = {Path(r.input).name: r for r in summary.results}
    good = ["good0.nii.gz", "good1.nii.gz", "good2.nii.gz", "evil\nerror: forged.nii.gz"]
    assert sorted(name for name, r in status.items() if r.status == "done") == sorted(good)
    for name in good:
        mask = np.asarray(nib.load(out / name.replace(".nii.gz", "_mask.nii.gz")).dataobj)
        expected = _expected(folder / name)
        assert 0 < expected.sum() < expected.size
        np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    for name, (_, words) in BAD_FILES.items():
        assert status[name].status == "failed" and name in status[name].error and words in status[name].error, status[name]
    assert status["bug.nii.gz"].status == "failed" and status["bug.nii.gz"].error == "TypeError: unexpected bug"
    record = json.loads((out / "predictions.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert record["counts"] == {"done": 4, "skipped": 0, "failed": len(BAD_FILES) + 1}
    failures = {Path(scan["input"]).name: scan["error"] for scan in record["scans"] if scan["status"] == "failed"}
    assert set(failures) == set(BAD_FILES) | {"bug.nii.gz"}
    text = summary.text()
    assert "evil\\nerror: forged" not in text  # a good scan: not listed among failures
    assert all(not line.startswith("error: forged") for line in text.splitlines())


def test_evaluate_refuses_each_bad_prediction(tmp_path, bad_folder):
    from pipelines.evaluate import evaluate_folder

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:6, 3:6, 2:4] = 1
    for name in BAD_FILES:
        _write(ref / name, _nifti_bytes(mask))
        (pred.mkdir(exist_ok=True), (pred / name).write_bytes((bad_folder / name).read_bytes()))
    result = evaluate_folder(pred, ref_dir=ref, out_dir=tmp_path / "eval", qc=False)
    by_id = {case.id: case for case in result.cases}
    for name, (_, words) in BAD_FILES.items():
        case = by_id[name.split(".nii")[0]]
        assert case.error is not None and name in case.error and words in case.error, (name, case.error)
    json.loads((tmp_path / "eval" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))


def _manifest_of(folder: Path, names, path: Path) -> Path:
    cases = [{"id": f"c{index}", "image": name, "label": None} for index, name in enumerate(names)]
    write_json(path, {"format": "planar3d-manifest/1", "dataset": "hostile", "root": str(folder), "cases": cases})
    return path


def test_manifest_check_and_training_checks_refuse_each_bad_image(tmp_path, bad_folder):
    from planar3d.preprocess import load_preprocessed
    from planar3d.data.checks import check_case, check_manifest
    from planar3d.data.manifest import load_manifest

    names = sorted(BAD_FILES)
    manifest = load_manifest(_manifest_of(bad_folder, names, tmp_path / "manifest.json"))
    problems = check_manifest(manifest)
    for index, name in enumerate(names):
        hits = [p for p in problems if p.startswith(f"case c{index}:")]
        assert len(hits) == 1 and name in hits[0] and BAD_FILES[name][1] in hits[0], (name, hits)
        assert check_case(manifest.cases[index], verify_hash=False) == hits
        with pytest.raises(InputError) as caught:  # the chain training and prediction share
            load_preprocessed(bad_folder / name)
        assert name in str(caught.value) and BAD_FILES[name][1] in str(caught.value)
    result = CliRunner().invoke(app, ["manifest", "check", str(tmp_path / "manifest.json")])
    assert result.exit_code == 1
    assert all(name in result.output for name in names)
    _write(bad_folder / "x\nerror: forged.nii.gz", b"broken")  # a name that would forge a line
    _manifest_of(bad_folder, ["x\nerror: forged.nii.gz"], tmp_path / "forged.json")
    result = CliRunner().invoke(app, ["manifest", "check", str(tmp_path / "forged.json")])
    assert result.exit_code == 1 and "x\\nerror: forged.nii.gz" in result.output
    assert not any(line.startswith("error: forged") for line in result.output.splitlines())


# --- JSON ---------------------------------------------------------------------------------------


def test_json_is_strict_and_undefined_values_are_explicit(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(ValueError):
        write_json(target, {"dice": math.nan})
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing, not even a temp file
    write_json(target, json_safe({"dice": math.nan, "hd": [math.inf, 1.5], "n": np.float32("nan")}))
    assert json.loads(target.read_text()) == {"dice": None, "hd": [None, 1.5], "n": None}


def test_every_json_writer_goes_through_write_json():
    """No module writes JSON with the permissive default (bare NaN) by itself."""
    offenders = []
    for folder in ("planar3d", "pipelines", "benchmarks"):
        for file in (PROJECT_ROOT / folder).rglob("*.py"):
            text = file.read_text()
            if "json.dump(" in text or ("json.dumps(" in text and "allow_nan=False" not in text and "default=str" not in text
                                          and "RESULT" not in text):
                offenders.append(str(file.relative_to(PROJECT_ROOT)))
    assert offenders == []


# --- outputs ------------------------------------------------------------------------------------


def test_two_inputs_with_one_output_are_refused_before_any_work(tmp_path):
    folder = tmp_path / "in"
    _write(folder / "scan.nii", _nifti_bytes(_good_data(0)))
    _write(folder / "scan.nii.gz", _nifti_bytes(_good_data(1)))
    _write(folder / "sub" / "Other.nii.gz", _nifti_bytes(_good_data(2)))
    _write(folder / "sub" / "other.nii.gz", _nifti_bytes(_good_data(3)))
    pairs = output_collisions([scan.relative for scan in find_inputs(folder)])
    assert pairs == [(PurePosixPath("scan.nii"), PurePosixPath("scan.nii.gz")),
                     (PurePosixPath("sub/Other.nii.gz"), PurePosixPath("sub/other.nii.gz"))]
    with pytest.raises(InputError) as caught:  # the model path does not exist: refused before it is read
        predict_folder(folder, tmp_path / "out", tmp_path / "no-model", progress=False)
    message = str(caught.value)
    assert "scan.nii and scan.nii.gz" in message and "sub/Other.nii.gz and sub/other.nii.gz" in message
    assert not (tmp_path / "out").exists()


def test_output_folder_checks_come_before_the_model(tmp_path):
    folder = tmp_path / "in"
    _write(folder / "scan.nii.gz", _nifti_bytes(_good_data()))
    with pytest.raises(InputError, match="output folder is the input folder"):
        predict_folder(folder, folder, tmp_path / "no-model", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        predict_folder(folder, tmp_path / "file", tmp_path / "no-model", progress=False)
    with pytest.raises(InputError, match="output folder is the input file"):
        check_output_folder(folder / "scan.nii.gz", folder / "scan.nii.gz")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "-i", str(folder), "-o", str(folder), "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 1 and "output folder is the input folder" in result.output


def test_read_only_output_folder_is_named_before_the_model(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    _write(folder / "scan.nii.gz", _nifti_bytes(_good_data()))
    import planar3d.io as planar_io

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(planar_io.tempfile, "mkstemp", read_only)  # root ignores chmod, so simulate
    with pytest.raises(InputError) as caught:
        predict_folder(folder, tmp_path / "out", tmp_path / "no-model", progress=False)
    assert str(caught.value) == f"{tmp_path / 'out'}: output folder is not writable (read-only or no permission)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_output_folder(out)
    finally:
        out.chmod(0o755)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder with best.pt of a tiny random planar res-u-net (masks mean nothing)."""
    from planar3d.checkpoint import MODEL_FORMAT, save_checkpoint
    from planar3d.networks import PlanarResUNet, PlanarResUNetConfig

    config = PlanarResUNetConfig(width=0.0625)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint({
        "format": MODEL_FORMAT, "state_dict": PlanarResUNet(config).state_dict(), "network": config.to_dict(),
        "normalization": NormalizationConfig().to_dict(), "orientation": "RAS", "threshold": 0.5,
        "inference": {"roi_size": None, "overlap": 0.25}, "training": {},
    }, run / "best.pt")
    return run


def test_full_disk_prints_the_summary_and_one_error_line(tmp_path, tiny_run, monkeypatch):
    folder = tmp_path / "in"
    for index in range(2):
        _write(folder / f"scan{index}.nii.gz", _nifti_bytes(_good_data(index)))
    out = tmp_path / "out"

    def full_disk(fd):  # every atomic write fails after its data went into the temp file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    result = CliRunner().invoke(app, ["predict", "-i", str(folder), "-o", str(out), "--model", str(tiny_run)])
    assert result.exit_code == 1, result.output
    assert "0 done, 0 skipped, 2 failed" in result.output
    for index in range(2):  # in the summary printed to the console
        assert f"FAILED {folder / f'scan{index}.nii.gz'}: OSError: [Errno 28] No space left on device" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write the batch summary: No space left on device" in errors[0]
    assert "Traceback" not in result.output
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.parent.name != "claims"]
    assert leftovers == []  # no mask, no temp file, no summary
    assert list((out / ".planar3d" / "claims").iterdir()) == []


def test_file_names_with_control_characters_are_escaped(tmp_path, tiny_run):
    assert display_path("a\nb\x1b[31m\\c") == "a\\nb\\x1b[31m\\\\c"
    folder = tmp_path / "in"
    _write(folder / "bad\nerror: forged.nii.gz", b"not a nifti")
    result = CliRunner().invoke(app, ["predict", "-i", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_run)])
    assert result.exit_code == 1
    assert "bad\\nerror: forged.nii.gz" in result.output
    assert not any(line.startswith("error: forged") for line in result.output.splitlines())
    assert str(InputError(folder / "x\ny.nii", "broken")).count("\n") == 0


# --- manifest paths -----------------------------------------------------------------------------


def test_manifest_symlink_out_of_the_root_is_refused(tmp_path):
    from planar3d.data.manifest import load_manifest

    root, outside = tmp_path / "data", tmp_path / "secret"
    _write(outside / "scan.nii.gz", _nifti_bytes(_good_data()))
    _write(root / "inside.nii.gz", _nifti_bytes(_good_data()))
    (root / "link.nii.gz").symlink_to(outside / "scan.nii.gz")
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    (root / "inner_link.nii.gz").symlink_to(root / "inside.nii.gz")  # stays inside: fine
    assert len(load_manifest(_manifest_of(root, ["inside.nii.gz", "inner_link.nii.gz"], tmp_path / "ok.json")).cases) == 2
    for name in ("link.nii.gz", "linked_folder/scan.nii.gz"):
        with pytest.raises(InputError, match="symlink .* outside the root"):
            load_manifest(_manifest_of(root, [name], tmp_path / "m.json"))
    for name in ("../secret/scan.nii.gz", str(outside / "scan.nii.gz")):
        with pytest.raises(InputError, match="escapes the root"):
            load_manifest(_manifest_of(root, [name], tmp_path / "m.json"))


# --- malicious pickles --------------------------------------------------------------------------


class _Payload:
    """Unpickling this would run code (create a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickles_are_refused_on_every_load_path(tmp_path):
    from pipelines import export, train
    from planar3d.checkpoint import MODEL_FORMAT, load_checkpoint, load_model
    from planar3d.inflate import load_encoder_checkpoint
    from planar3d.vgg import read_state_dict_file

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"format": MODEL_FORMAT, "state_dict": _Payload(marker)}, run / name)
    evil = run / "best.pt"
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "load_model": lambda: load_model(evil),
        "vgg16 state dict": lambda: read_state_dict_file(evil),
        "encoder checkpoint": lambda: load_encoder_checkpoint(evil),
        "train resume": lambda: train._resume_state(run, None, None, None, None),
        "export torchscript": lambda: export.export_model(run, "torchscript", tmp_path / "m.ts"),
        "export onnx": lambda: export.export_model(run, "onnx", tmp_path / "m.onnx"),
        "export bundle": lambda: export.export_model(run, "bundle", tmp_path / "bundle"),
        "predict": lambda: predict_folder(_write(tmp_path / "in" / "s.nii.gz", _nifti_bytes(_good_data())),
                                          tmp_path / "out", run, progress=False),
    }
    for name, loader in loaders.items():
        with pytest.raises(WeightsError, match="refused by the safe loader"):
            loader()
        assert not marker.exists(), name
    runner = CliRunner()
    for args in (["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(run)],
                 ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
                 ["inflate", "--vgg16", str(evil), "--out", str(tmp_path / "enc.pt")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "refused by the safe loader" in result.output, (args, result.output)
        assert not marker.exists()


# --- claims, temporary files, concurrent workers ------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_claims_are_exclusive_and_stale_ones_reclaimed(tmp_path):
    claims = ScanClaims(tmp_path / "claims", stale_after=60)
    assert claims.acquire("a_mask.nii.gz") and claims.acquire("a_mask.nii.gz")  # ours: still ours
    path = claims.path("b_mask.nii.gz")
    record = {"host": host_name(), "pid": os.getppid(), "time": time.time()}  # a live process here
    path.write_text(json.dumps(record))
    assert not claims.acquire("b_mask.nii.gz") and claims.holder("b_mask.nii.gz") == f"{os.getppid()}@{host_name()}"
    path.write_text(json.dumps({**record, "pid": _dead_pid()}))  # killed: reclaimed at once
    assert claims.acquire("b_mask.nii.gz") and claims.holder("b_mask.nii.gz") == f"{os.getpid()}@{host_name()}"
    other = claims.path("c_mask.nii.gz")
    other.write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # another machine, fresh: kept
    assert not claims.acquire("c_mask.nii.gz")
    os.utime(other, (time.time() - 61, time.time() - 61))  # ... and older than the timeout: reclaimed
    assert claims.acquire("c_mask.nii.gz")
    assert claims.path("D_mask.nii.gz") == claims.path("d_mask.nii.gz")  # names differing in case share one
    claims.release("a_mask.nii.gz")
    assert not claims.path("a_mask.nii.gz").exists()
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == sorted(
        claims.path(k).name for k in ("b_mask.nii.gz", "c_mask.nii.gz"))


def test_a_claim_is_never_visible_without_its_record(tmp_path, monkeypatch):
    """A worker killed while claiming leaves no empty claim: one would read as nobody's and block
    the scan for 6 hours (seen as a flaky kill-and-rerun test)."""
    claims = ScanClaims(tmp_path / "claims")

    def killed(*args):
        raise SystemExit("killed between writing the record and linking it")

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(SystemExit):
        claims.acquire("a_mask.nii.gz")
    assert not claims.path("a_mask.nii.gz").exists()
    monkeypatch.undo()
    assert claims.acquire("a_mask.nii.gz") and claims.read(claims.path("a_mask.nii.gz"))["key"] == "a_mask.nii.gz"

    def no_links(*args):
        raise PermissionError("this disk has no hard links")

    monkeypatch.setattr(os, "link", no_links)  # exclusive create instead, with the same record
    assert claims.acquire("b_mask.nii.gz") and claims.read(claims.path("b_mask.nii.gz"))["pid"] == os.getpid()
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == sorted(
        claims.path(k).name for k in ("a_mask.nii.gz", "b_mask.nii.gz"))  # no drafts left


def test_leftover_temporary_files_are_cleaned_on_the_next_run(tmp_path, tiny_run):
    folder = tmp_path / "in"
    _write(folder / "scan.nii.gz", _nifti_bytes(_good_data()))
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".scan_mask.nii.gz.p{_dead_pid()}@{host_name()}.k3j_x9aa.tmp.nii.gz"
    live = out / f".other_mask.nii.gz.p{os.getppid()}@{host_name()}.abc12345.tmp.nii.gz"
    far_old = out / ".x.json.p12@elsewhere.abc12345.tmp.json"
    far_new = out / ".y.json.p12@elsewhere.abc12345.tmp.json"
    foreign = out / ".scan_mask.nii.gz.user-notes.tmp"
    for file in (dead, live, far_old, far_new, foreign):
        file.write_bytes(b"partial")
    os.utime(far_old, (time.time() - 7200, time.time() - 7200))
    summary = predict_folder(folder, out, tiny_run, progress=False)
    assert len(summary.done) == 1
    assert not dead.exists() and not far_old.exists()
    assert live.exists() and far_new.exists() and foreign.exists()
    assert remove_stale_temporaries(out) == []


def _cli(*args: str) -> list:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def many_scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for index in range(9):
        _write(folder / f"s{index}" / f"scan{index}.nii.gz", _nifti_bytes(_good_data(index, (24, 20, 12))))
    return folder


def _masks(out: Path) -> dict:
    return {str(p.relative_to(out)): np.asarray(nib.load(p).dataobj) for p in sorted(out.rglob("*_mask.nii.gz"))}


def _parts(out: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted((out / ".planar3d" / "parts").glob("*.json"))]


def _slurm_task(many_scans: Path, out: Path, run: Path, task: int, tasks: int, bin_dir: Path) -> subprocess.Popen:
    """One task of scripts/slurm/predict_parts.sbatch, as Slurm would start it (``planar3d`` on PATH)."""
    shim = bin_dir / "planar3d"
    if not shim.exists():  # written once: rewriting it while another task runs it fails (text file busy)
        bin_dir.mkdir(exist_ok=True)
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m pipelines.cli \"$@\"\n")
        shim.chmod(0o755)
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_COUNT": str(tasks),
           "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_CPUS_PER_TASK": "1"}
    script = PROJECT_ROOT / "scripts" / "slurm" / "predict_parts.sbatch"
    return subprocess.Popen(["bash", str(script), str(many_scans), str(out), str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sharded", [False, True])
def test_concurrent_workers_share_one_output_folder(tmp_path, many_scans, tiny_run, sharded):
    """Three processes at once: each scan done once, one merged summary, masks as a single run's.

    Unsharded: three ``planar3d predict`` on the same -i/-o (the claims share the work). Sharded:
    the three tasks of the Slurm array script (``--num-parts 3 --part-id $SLURM_ARRAY_TASK_ID``).
    """
    out = tmp_path / "out"
    if sharded:
        workers = [_slurm_task(many_scans, out, tiny_run, i, 3, tmp_path / "bin") for i in range(3)]
    else:
        workers = [
            subprocess.Popen(_cli("predict", "-i", str(many_scans), "-o", str(out), "--model", str(tiny_run)),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], outputs
    parts = _parts(out)
    assert len(parts) == 3
    done = [scan["output"] for part in parts for scan in part["scans"] if scan["status"] == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == 9  # nobody did a scan twice
    if sharded:  # the parts partition the scans exactly
        inputs = [scan["input"] for part in parts for scan in part["scans"]]
        assert sorted(inputs) == sorted(str(s.path) for s in find_inputs(many_scans))
    merged = json.loads((out / "predictions.json").read_text())
    assert merged["counts"] == {"done": 9, "skipped": 0, "failed": 0}
    assert sorted(scan["output"] for scan in merged["scans"]) == sorted(done)
    assert list((out / ".planar3d" / "claims").iterdir()) == []
    assert not [p for p in out.rglob(".*.tmp*")]
    reference = tmp_path / "reference"
    predict_folder(many_scans, reference, tiny_run, progress=False)
    expected = _masks(reference)
    assert len(expected) == 9 and all(np.array_equal(_masks(out)[k], v) for k, v in expected.items())


def test_kubernetes_indexed_job_runs_one_part_per_index():
    import yaml

    job = yaml.safe_load((PROJECT_ROOT / "scripts" / "k8s" / "predict-indexed-job.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert int(env["NUM_PARTS"]) == spec["completions"] == spec["parallelism"]
    command = " ".join(container["args"])
    assert command.startswith("exec planar3d predict ")
    assert '--num-parts "$NUM_PARTS" --part-id "$JOB_COMPLETION_INDEX"' in command


def test_merge_summaries_command(tmp_path, many_scans, tiny_run):
    out = tmp_path / "out"
    predict_folder(many_scans, out, tiny_run, num_parts=2, part_id=0, progress=False)
    merged = json.loads((out / "predictions.json").read_text())
    assert merged["counts"] == {"done": 5, "skipped": 0, "failed": 0, "pending": 4}
    predict_folder(many_scans, out, tiny_run, num_parts=2, part_id=1, progress=False)
    (out / "predictions.json").unlink()
    result = CliRunner().invoke(app, ["predict", "-i", str(many_scans), "-o", str(out), "--merge-summaries"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "predictions.json").read_text())["counts"] == {"done": 9, "skipped": 0, "failed": 0}
    predict_folder(many_scans, out, tiny_run, progress=False)  # a rerun skips all; the merge keeps the lesion counts
    scans = json.loads((out / "predictions.json").read_text())["scans"]
    assert {scan["status"] for scan in scans} == {"done"} and all(scan["lesions"] is not None for scan in scans)


def test_kill_during_predict_then_rerun_gives_identical_masks(tmp_path, many_scans, tiny_run):
    reference = tmp_path / "reference"
    predict_folder(many_scans, reference, tiny_run, progress=False)
    out = tmp_path / "out"
    worker = subprocess.Popen(_cli("predict", "-i", str(many_scans), "-o", str(out), "--model", str(tiny_run)),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.rglob("*_mask.nii.gz")) and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # what a kill between write and rename leaves: a temp file named after the dead process
    (out / "s0").mkdir(parents=True, exist_ok=True)
    (out / "s0" / f".scan0_mask.nii.gz.p{worker.pid}@{host_name()}.zz9_zz9z.tmp.nii.gz").write_bytes(b"partial")
    result = subprocess.run(_cli("predict", "-i", str(many_scans), "-o", str(out), "--model", str(tiny_run)),
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = _masks(reference)
    assert sorted(_masks(out)) == sorted(expected)
    assert all(np.array_equal(_masks(out)[k], v) for k, v in expected.items())
    assert not [p for p in out.rglob(".*.tmp*")]
    assert json.loads((out / "predictions.json").read_text())["counts"]["failed"] == 0


def test_train_export_and_evaluate_check_their_output_folder(tmp_path, tiny_run):
    from pipelines.evaluate import evaluate_folder
    from pipelines.export import export_model
    from pipelines.train import train

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="a_file: output exists and is not a folder"):
        train(tmp_path / "no-manifest.json", 0, blocker, config=None)  # refused before the config is used
    with pytest.raises(InputError, match="a_file: output exists and is not a folder"):
        export_model(tiny_run, "torchscript", blocker / "model.ts")
    (tmp_path / "pred").mkdir()
    with pytest.raises(InputError, match="a_file: output exists and is not a folder"):
        evaluate_folder(tmp_path / "pred", ref_dir=tmp_path, out_dir=blocker)


def test_nifti2_spacing_is_checked_too(tmp_path):
    image = nib.Nifti2Image(_good_data(), np.diag([1.0, 1.0, 2.0, 1.0]))
    good = tmp_path / "good2.nii"
    nib.save(image, good)
    assert load_image(good).header.get_zooms()[:3] == (1.0, 1.0, 2.0)
    raw = bytearray(good.read_bytes())
    raw[112 + 8:112 + 16] = np.float64(np.nan).tobytes()  # pixdim[2] of a NIfTI-2 header
    bad = _write(tmp_path / "nan2.nii.gz", bytes(raw))
    with pytest.raises(InputError, match="nan2.nii.gz: voxel spacing .* must be finite and > 0"):
        load_image(bad)


def test_merge_matches_outputs_however_workers_spell_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    for index in range(4):
        _write(folder / f"scan{index}.nii.gz", _nifti_bytes(_good_data(index)))
    scans = find_inputs(folder)
    settings = InferenceSettings.from_checkpoint(META, min_lesion_size=0)
    predict_with_model(ThresholdModel(), META, scans[0::2], tmp_path / "out", settings, progress=False,
                       num_parts=2, part_id=0, all_scans=scans)
    monkeypatch.chdir(tmp_path)  # the second worker names the folder relative to its working directory
    predict_with_model(ThresholdModel(), META, scans[1::2], Path("out"), settings, progress=False,
                       num_parts=2, part_id=1, all_scans=scans)
    merged = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert merged["counts"] == {"done": 4, "skipped": 0, "failed": 0}
