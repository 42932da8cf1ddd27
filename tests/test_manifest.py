"""Tests of planar3d.data.manifest: format, validation, builders, folds, shipped manifests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from planar3d.data.manifest import (
    FORMAT,
    Case,
    build_manifest,
    hash_manifest,
    load_manifest,
    save_manifest,
    stratified_folds,
    verify_manifest,
)
from planar3d.errors import InputError
from planar3d.io import sha256_file

PROJECT = Path(__file__).parents[1]
SHARED_DATA = PROJECT / ".." / "shared" / "data"
MANIFESTS = PROJECT / "data_manifests"
MSSEG_IDS = (
    "01016SACH 01038PAGU 01039VITE 01040VANE 01042GULE 07001MOEL 07003SATH 07010NABO "
    "07040DORE 07043SEME 08002CHJE 08027SYBR 08029IVDI 08031SEVE 08037ROGU"
).split()


def _nifti(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), value, np.uint8), np.eye(4)), path)
    return path


def _data(ids=("a1", "a2", "b1", "b2")) -> dict:
    return {
        "format": FORMAT,
        "dataset": "toy",
        "description": "tiny",
        "root": "data",
        "cases": [
            {"id": i, "image": f"{i}/flair.nii.gz", "label": f"{i}/mask.nii.gz", "group": i[0],
             "sha256": {"image": None, "label": None}}
            for i in ids
        ],
        "folds": [["a1", "b1"], ["a2", "b2"]],
    }


def _write(tmp_path: Path, data: dict, name: str = "toy.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_resolves_paths_and_folds(tmp_path):
    manifest = load_manifest(_write(tmp_path, _data()))
    root = (tmp_path / "data").resolve()
    assert manifest.root == root
    assert manifest.case("b2").image == root / "b2" / "flair.nii.gz"
    assert manifest.case("b2").label == root / "b2" / "mask.nii.gz"
    assert manifest.case("b2").group == "b"
    assert [c.id for c in manifest.test_cases(1)] == ["a2", "b2"]
    assert [c.id for c in manifest.train_cases(1)] == ["a1", "b1"]
    assert manifest.source == tmp_path / "toy.json"
    with pytest.raises(InputError, match="toy.json: fold 2 does not exist"):
        manifest.test_cases(2)
    with pytest.raises(InputError, match="no case with id 'zz'"):
        manifest.case("zz")


def test_unlabeled_cases_are_not_trained_on(tmp_path):
    data = _data()
    data["cases"].append({"id": "c1", "image": "c1.nii.gz", "label": None})
    manifest = load_manifest(_write(tmp_path, data))
    assert manifest.case("c1").label is None
    assert [c.id for c in manifest.train_cases(0)] == ["a2", "b2"]


def test_save_round_trip(tmp_path):
    source = _write(tmp_path, _data())
    manifest = load_manifest(source)
    (tmp_path / "sub").mkdir()
    target = tmp_path / "sub" / "copy.json"
    save_manifest(manifest, target)
    saved = json.loads(target.read_text())
    expected = _data()
    expected["root"] = "../data"
    assert saved == expected
    again = load_manifest(target)
    assert again.cases == manifest.cases
    assert again.folds == manifest.folds
    assert again.root == manifest.root


def test_root_override(tmp_path):
    other = tmp_path / "elsewhere"
    manifest = load_manifest(_write(tmp_path, _data()), root=other)
    assert manifest.root == other.resolve()
    assert manifest.case("a1").image == other.resolve() / "a1" / "flair.nii.gz"


def test_absolute_path_inside_root_is_accepted(tmp_path):
    data = _data()
    data["root"] = str(tmp_path / "data")
    data["cases"][0]["image"] = str(tmp_path / "data" / "x" / "f.nii.gz")
    manifest = load_manifest(_write(tmp_path, data))
    assert manifest.case("a1").image == (tmp_path / "data" / "x" / "f.nii.gz").resolve()


def _mutate(change):
    data = _data()
    change(data)
    return data


REJECTIONS = {
    "format": (lambda d: d.update(format="planar3d-manifest/9"), "unknown format 'planar3d-manifest/9'"),
    "missing key": (lambda d: d.pop("cases"), "the manifest is missing key\\(s\\) 'cases'"),
    "missing case key": (lambda d: d["cases"][1].pop("image"), "cases\\[1\\] is missing key\\(s\\) 'image'"),
    "unknown key": (lambda d: d.update(fold=[]), "the manifest has unknown key\\(s\\) 'fold'"),
    "duplicate id": (lambda d: d["cases"][2].update(id="a1"), "duplicate case id 'a1'"),
    "unknown fold case": (lambda d: d["folds"][1].append("zz"), "folds\\[1\\] names unknown case 'zz'"),
    "case in two folds": (lambda d: d["folds"][1].append("a1"), "case 'a1' is in folds\\[0\\] and folds\\[1\\]"),
    "dotdot": (lambda d: d["cases"][0].update(image="../outside.nii.gz"), "case 'a1': image path '../outside.nii.gz' escapes the root"),
    "inner dotdot": (lambda d: d["cases"][3].update(label="b2/../../x.nii.gz"), "case 'b2': label path 'b2/../../x.nii.gz' escapes"),
    "absolute outside": (lambda d: d["cases"][0].update(image="/etc/passwd"), "case 'a1': image path '/etc/passwd' escapes"),
    "bad hash": (lambda d: d["cases"][0]["sha256"].update(image="abc"), "case 'a1': sha256 of image is not"),
    "unlabeled in fold": (lambda d: d["cases"][0].update(label=None), "folds\\[0\\] names case 'a1', which has no label"),
}


@pytest.mark.parametrize("name", REJECTIONS)
def test_rejections(tmp_path, name):
    change, message = REJECTIONS[name]
    path = _write(tmp_path, _mutate(change), "bad_manifest.json")
    with pytest.raises(InputError, match="bad_manifest.json: " + message):
        load_manifest(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="nope.json: file not found"):
        load_manifest(tmp_path / "nope.json")
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="broken.json: not a readable JSON file"):
        load_manifest(bad)


def test_build_msseg(tmp_path):
    for case_id in ("01016SACH", "01038PAGU", "07001MOEL", "07003SATH"):
        _nifti(tmp_path / case_id / "3DFLAIR.nii.gz")
        _nifti(tmp_path / case_id / "Consensus.nii.gz")
    _nifti(tmp_path / "08002CHJE" / "3DFLAIR.nii.gz")  # unlabeled
    (tmp_path / "notes").mkdir()
    manifest = build_manifest(tmp_path, "auto", dataset="msseg", num_folds=2, seed=0)
    assert manifest.dataset == "msseg"
    assert [c.id for c in manifest.cases] == ["01016SACH", "01038PAGU", "07001MOEL", "07003SATH", "08002CHJE"]
    assert [c.group for c in manifest.cases] == ["01", "01", "07", "07", "08"]
    assert manifest.case("08002CHJE").label is None
    assert manifest.case("07001MOEL").label == tmp_path.resolve() / "07001MOEL" / "Consensus.nii.gz"
    for fold in manifest.folds:
        assert sorted(case_id[:2] for case_id in fold) == ["01", "07"]


def test_build_mslub_raw(tmp_path):
    for n in (1, 2, 3):
        _nifti(tmp_path / f"patient0{n}" / "FLAIR.nii.gz")
        _nifti(tmp_path / f"patient0{n}" / "consensus_gt.nii.gz")
    manifest = build_manifest(tmp_path, "msseg", num_folds=3)
    assert [(c.id, c.image.name, c.label.name, c.group) for c in manifest.cases] == [
        (f"patient0{n}", "FLAIR.nii.gz", "consensus_gt.nii.gz", None) for n in (1, 2, 3)
    ]
    assert sorted(len(fold) for fold in manifest.folds) == [1, 1, 1]


def test_build_nnunet(tmp_path):
    for name in ("ms_001", "ms_002"):
        _nifti(tmp_path / "imagesTr" / f"{name}_0000.nii.gz")
        _nifti(tmp_path / "imagesTr" / f"{name}_0001.nii.gz")
    _nifti(tmp_path / "labelsTr" / "ms_001.nii.gz")
    manifest = build_manifest(tmp_path, num_folds=0)
    assert [(c.id, c.image.name, c.label and c.label.name) for c in manifest.cases] == [
        ("ms_001", "ms_001_0000.nii.gz", "ms_001.nii.gz"),
        ("ms_002", "ms_002_0000.nii.gz", None),
    ]
    assert manifest.folds == []


def test_build_bids(tmp_path):
    _nifti(tmp_path / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz")
    _nifti(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_FLAIR.nii.gz")
    _nifti(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz")
    _nifti(tmp_path / "derivatives" / "lesions" / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_FLAIR_desc-lesion_mask.nii.gz")
    _nifti(tmp_path / "derivatives" / "lesions" / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_FLAIR.json.nii.gz")
    manifest = build_manifest(tmp_path, "auto", num_folds=1)
    assert [c.id for c in manifest.cases] == ["sub-01", "sub-02_ses-1"]
    assert manifest.case("sub-01").label is None
    assert manifest.case("sub-02_ses-1").label.name == "sub-02_ses-1_FLAIR_desc-lesion_mask.nii.gz"
    assert manifest.folds == [["sub-02_ses-1"]]


def test_build_errors(tmp_path):
    with pytest.raises(InputError, match="no case found in the msseg layout"):
        build_manifest(tmp_path)
    with pytest.raises(InputError, match="folder not found"):
        build_manifest(tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown layout"):
        build_manifest(tmp_path, "dicom")


def _cases(groups: dict[str, int]) -> list[Case]:
    return [Case(f"{g}{n:02d}", Path(f"/x/{g}{n}"), Path(f"/x/{g}{n}_m"), g) for g, count in groups.items() for n in range(count)]


def test_stratified_folds_balanced_and_deterministic():
    cases = _cases({"A": 7, "B": 5, "C": 3})
    folds = stratified_folds(cases, 5, seed=3)
    assert folds == stratified_folds(list(reversed(cases)), 5, seed=3)
    assert folds != stratified_folds(cases, 5, seed=4)
    assert sorted(i for fold in folds for i in fold) == sorted(c.id for c in cases)
    assert [len(fold) for fold in folds] == [3, 3, 3, 3, 3]
    for group, count in (("A", 7), ("B", 5), ("C", 3)):
        per_fold = [sum(i.startswith(group) for i in fold) for fold in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    with pytest.raises(ValueError, match="cannot make 16 folds from 15 labeled cases"):
        stratified_folds(cases, 16)


def test_shipped_msseg2016():
    manifest = load_manifest(MANIFESTS / "msseg2016.json")
    assert [c.id for c in manifest.cases] == MSSEG_IDS
    assert manifest.folds[0] == ["01042GULE", "07043SEME", "08037ROGU"]
    assert len(manifest.folds) == 5
    assert sorted(i for fold in manifest.folds for i in fold) == MSSEG_IDS
    for fold in manifest.folds:
        assert [i[:2] for i in fold] == ["01", "07", "08"]
    assert all(c.group == c.id[:2] and c.image.name == "3DFLAIR.nii.gz" and c.label.name == "Consensus.nii.gz" for c in manifest.cases)
    assert len(manifest.train_cases(0)) == 12


def test_shipped_mslub2018():
    manifest = load_manifest(MANIFESTS / "mslub2018.json")
    assert [c.id for c in manifest.cases] == [f"patient{n:02d}" for n in range(1, 31)]
    assert [len(fold) for fold in manifest.folds] == [6] * 5
    assert manifest.folds == stratified_folds(manifest.cases, 5, seed=0)


def test_shipped_mslub_mni_patient26_verifies():
    if not (SHARED_DATA / "mslub_mni" / "patient26_flair.nii.gz").exists():
        pytest.skip("../shared/data/mslub_mni not available")
    manifest = load_manifest(MANIFESTS / "mslub_mni_patient26.json")
    assert manifest.root == (SHARED_DATA / "mslub_mni").resolve()
    assert manifest.folds == []
    assert verify_manifest(manifest) == []


def test_hash_and_verify(tmp_path):
    data = _data(("a1", "b1"))
    data["folds"] = []
    for case in data["cases"]:
        _nifti(tmp_path / "data" / case["image"])
        _nifti(tmp_path / "data" / case["label"], 1)
    manifest = hash_manifest(load_manifest(_write(tmp_path, data)))
    assert manifest.case("a1").sha256["image"] == sha256_file(tmp_path / "data" / "a1" / "flair.nii.gz")
    assert verify_manifest(manifest) == []
    _nifti(tmp_path / "data" / "b1" / "mask.nii.gz", 0)
    (tmp_path / "data" / "a1" / "flair.nii.gz").unlink()
    problems = verify_manifest(manifest)
    assert len(problems) == 2
    assert problems[0] == f"case a1: image {(tmp_path / 'data' / 'a1' / 'flair.nii.gz').resolve()}: file not found"
    assert problems[1].startswith(f"case b1: label {(tmp_path / 'data' / 'b1' / 'mask.nii.gz').resolve()}: sha256 mismatch")
    with pytest.raises(InputError, match="flair.nii.gz: case 'a1': cannot read image"):
        hash_manifest(manifest)
