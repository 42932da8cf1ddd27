"""Tests of the ``planar3d manifest`` subcommands through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from pipelines.cli import app
from planar3d.data.manifest import load_manifest
from planar3d.io import sha256_file

runner = CliRunner()


def _nifti(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((2, 3, 4), value, np.uint8), np.eye(4)), path)


def _msseg(folder: Path) -> Path:
    for case_id in ("01016SACH", "01038PAGU", "07001MOEL", "07003SATH"):
        _nifti(folder / case_id / "3DFLAIR.nii.gz", 7)
        _nifti(folder / case_id / "Consensus.nii.gz", 1)
    return folder


def test_build_hash_verify_check(tmp_path):
    data = _msseg(tmp_path / "data")
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["manifest", "build", str(data), "--out", str(out), "--folds", "2", "--dataset", "toy"])
    assert result.exit_code == 0, result.output
    assert "4 cases, 2 folds" in result.output
    manifest = load_manifest(out)
    assert manifest.dataset == "toy"
    assert manifest.case("01016SACH").sha256 == {"image": None, "label": None}

    hashed = tmp_path / "hashed.json"
    result = runner.invoke(app, ["manifest", "hash", str(out), "--out", str(hashed)])
    assert result.exit_code == 0, result.output
    image = data / "07001MOEL" / "3DFLAIR.nii.gz"
    assert load_manifest(hashed).case("07001MOEL").sha256["image"] == sha256_file(image)

    assert runner.invoke(app, ["manifest", "verify", str(hashed)]).exit_code == 0
    result = runner.invoke(app, ["manifest", "check", str(hashed), "--fold", "1"])
    assert result.exit_code == 0, result.output

    _nifti(image, 8)
    _nifti(data / "01016SACH" / "Consensus.nii.gz", 2)
    result = runner.invoke(app, ["manifest", "verify", str(hashed)])
    assert result.exit_code == 1
    assert "case 07001MOEL: image" in result.output and "sha256 mismatch" in result.output
    result = runner.invoke(app, ["manifest", "check", str(hashed)])
    assert result.exit_code == 1
    assert "not binary (values found: 2)" in result.output
    assert "3 problem(s)" in result.output


def test_build_with_hash_and_root_override(tmp_path):
    data = _msseg(tmp_path / "data")
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["manifest", "build", str(data), "--out", str(out), "--folds", "2", "--hash", "--layout", "msseg"])
    assert result.exit_code == 0, result.output
    assert all(case.sha256["label"] for case in load_manifest(out).cases)
    moved = tmp_path / "moved"
    data.rename(moved)
    assert runner.invoke(app, ["manifest", "verify", str(out)]).exit_code == 1
    result = runner.invoke(app, ["manifest", "verify", str(out), "--root", str(moved)])
    assert result.exit_code == 0, result.output


def test_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["manifest", "build", str(tmp_path), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 1
    assert "no case found" in result.output and "Traceback" not in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    for command in ("verify", "check", "hash"):
        result = runner.invoke(app, ["manifest", command, str(bad)])
        assert result.exit_code == 1
        assert "bad.json: the manifest is missing key(s)" in result.output
    data = _msseg(tmp_path / "data")
    out = tmp_path / "m.json"
    assert runner.invoke(app, ["manifest", "build", str(data), "--out", str(out), "--folds", "2"]).exit_code == 0
    result = runner.invoke(app, ["manifest", "check", str(out), "--fold", "7"])
    assert result.exit_code == 1
    assert "fold 7 does not exist" in result.output


def test_merge_prefixes_ids_joins_folds_and_keeps_files(tmp_path):
    a = tmp_path / "phantoms" / "a.json"
    b = tmp_path / "injected" / "deep" / "b.json"
    assert runner.invoke(app, ["manifest", "build", str(_msseg(tmp_path / "msseg")), "--out", str(a), "--folds", "2", "--hash"]).exit_code == 0
    assert runner.invoke(app, ["manifest", "build", str(_msseg(tmp_path / "other")), "--out", str(b), "--folds", "1"]).exit_code == 0
    out = tmp_path / "merged.json"
    result = runner.invoke(app, ["manifest", "merge", str(a), str(b), "--out", str(out), "--dataset", "mix"])
    assert result.exit_code == 0, result.output
    merged, first, second = load_manifest(out), load_manifest(a), load_manifest(b)
    assert merged.dataset == "mix" and len(merged.cases) == 8
    assert [c.id for c in merged.cases[:4]] == [f"msseg_{c.id}" for c in first.cases]
    assert [c.id for c in merged.cases[4:]] == [f"other_{c.id}" for c in second.cases]
    for case, source in zip(merged.cases, first.cases + second.cases):
        assert (case.image, case.label, case.group, case.sha256) == (source.image, source.label, source.group, source.sha256)
    assert merged.folds[0] == [f"msseg_{i}" for i in first.folds[0]] + [f"other_{i}" for i in second.folds[0]]
    assert merged.folds[1] == [f"msseg_{i}" for i in first.folds[1]]
    same = runner.invoke(app, ["manifest", "merge", str(a), str(a), "--out", str(tmp_path / "twice.json")])
    assert same.exit_code == 0 and load_manifest(tmp_path / "twice.json").cases[4].id.startswith("1_")
