"""Pure parts of benchmarks/build_training_set.py (the synth runs themselves are not run here)."""

import importlib.util
import json
from pathlib import Path

import pytest

from planar3d.data.hosts import host_key
from planar3d.data.manifest import load_manifest

_SPEC = importlib.util.spec_from_file_location("build_training_set", Path(__file__).resolve().parents[1] / "benchmarks" / "build_training_set.py")
bts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bts)


def _touch(folder: Path, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_patient26_is_refused_as_host_and_template(tmp_path):
    _touch(tmp_path / "real", "a.nii.gz", "patient26_flair.nii.gz")
    with pytest.raises(SystemExit, match="patient26"):
        bts.find_hosts(tmp_path / "real")
    with pytest.raises(SystemExit, match="registration template"):
        bts.check_template(str(tmp_path / "real" / "patient26_flair.nii.gz"), dry_run=True)


def test_hosts_are_named_by_file_stem_and_filtered(tmp_path):
    _touch(tmp_path / "real", "b.nii.gz", "a.nii", "notes.txt")
    assert list(bts.find_hosts(tmp_path / "real")) == ["a", "b"]
    assert list(bts.find_hosts(tmp_path / "real", ["b"])) == ["b"]
    with pytest.raises(SystemExit, match="unknown host"):
        bts.find_hosts(tmp_path / "real", ["c"])


def test_patient26_mask_is_left_out_of_the_injected_masks(tmp_path):
    _touch(tmp_path / "masks", "patient01_lesions.nii.gz", "patient26_lesions.nii.gz", "patient27_lesions.nii.gz")
    folder, names = bts.checked_masks_dir(tmp_path / "masks", tmp_path / "out")
    assert names == ["patient01_lesions.nii.gz", "patient27_lesions.nii.gz"]
    assert sorted(p.name for p in folder.iterdir()) == names


def test_the_shared_lesion_mask_folder_holds_no_patient26():
    shared = Path("../shared/data/mslub_mni/lesion_masks")
    if not shared.is_dir():
        pytest.skip("shared data not present")
    folder, names = bts.checked_masks_dir(shared, Path("/nonexistent"))
    assert folder == shared and len(names) == 27 and not any("patient26" in n for n in names)


def test_relabel_records_the_host_in_each_group(tmp_path):
    manifest = {"format": "planar3d-manifest/1", "dataset": "synthetic", "root": ".", "description": "",
                "cases": [{"id": f"case_{i:03d}", "image": f"images/{i}.nii.gz", "label": f"labels/{i}.nii.gz",
                           "group": g, "sha256": {"image": None, "label": None}}
                          for i, g in enumerate(["host-LPS", "host-LPS-brain", "host-LPS"])],
                "folds": [["case_000"], ["case_001"], ["case_002"]]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    bts.relabel_part(path, "clinical_4mm", "clinical_4mm", keep=["case_000", "case_001"])
    bts.relabel_part(path, "clinical_4mm", "clinical_4mm")  # idempotent
    loaded = load_manifest(path)
    assert loaded.dataset == "clinical_4mm"
    assert [c.group for c in loaded.cases] == ["host-clinical_4mm-LPS", "host-clinical_4mm-LPS-brain"]
    assert {host_key(c) for c in loaded.cases} == {"clinical_4mm-LPS"}
    assert loaded.folds == [["case_000", "case_001"]]


def test_select_by_load():
    loads = {"a": 0.001, "b": 0.03, "c": 0.0019, "d": 0.005, "e": 0.01}
    assert bts.select_by_load(loads, 1, "light") == ["a"] and bts.select_by_load(loads, 1, "heavy") == ["b"]
    assert bts.select_by_load(loads, 5, "light") == ["a", "c"] and bts.select_by_load(loads, 5, "heavy") == ["b", "e"]
    with pytest.raises(SystemExit, match="no heavy"):
        bts.select_by_load({"a": 0.001}, 2, "heavy")
    with pytest.raises(SystemExit, match="no light"):
        bts.select_by_load({"a": 0.002}, 2, "light")  # 0.2 % is not light


def test_light_masks_are_those_under_a_fifth_of_a_percent_of_the_mni_brain(tmp_path):
    import nibabel as nib
    import numpy as np

    brain = bts.mni_brain_mm3()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm³ voxels
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, voxels in (("light.nii.gz", int(0.0019 * brain / 8)), ("edge.nii.gz", int(0.0021 * brain / 8) + 1)):
        data = np.zeros(200_000, np.uint8)
        data[:voxels] = 1
        nib.save(nib.Nifti1Image(data.reshape(100, 100, 20), affine), str(masks / name))
    folder, names = bts.light_masks_dir(masks, ["edge.nii.gz", "light.nii.gz"], tmp_path / "out")
    assert names == ["light.nii.gz"] and sorted(p.name for p in folder.iterdir()) == ["light.nii.gz"]


def _dry_build(tmp_path, capsys, monkeypatch, *options):
    """The ``planar3d synth`` command lines of a dry-run build with host_b left out: (training, test)."""
    real = tmp_path / "real"
    _touch(real, "host_a.nii.gz", "host_b.nii.gz")
    masks = tmp_path / "masks"
    _touch(masks, "patient01_lesions.nii.gz")
    args = bts.parse_args(["--out", str(tmp_path / "out"), "--real-dir", str(real), "--lesion-masks", str(masks),
                           "--leave-out", "host_b", "--phantoms", "0", "--dry-run", *options])
    # the light masks are chosen by reading the masks' loads: empty stand-in files here
    monkeypatch.setattr(bts, "light_masks_dir", lambda *a, **k: (masks, ["patient01_lesions.nii.gz"]))
    bts.build(args)
    synth = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ planar3d synth --out")]
    return [line for line in synth if "/parts/host_" in line], [line for line in synth if "/parts/test_" in line]


def test_training_hosts_are_filled_and_the_left_out_host_is_not(tmp_path, capsys, monkeypatch):
    """The default build fills the training hosts' own lesions; the test cases of a left-out host keep theirs."""
    assert bts.parse_args(["--out", str(tmp_path)]).host_lesions == "fill"
    train, test = _dry_build(tmp_path, capsys, monkeypatch, "--light-cases-per-host", "0")
    assert train and all("--host-lesions fill" in line for line in train)
    assert test and not any("--host-lesions" in line for line in test)
    assert not any("--grey-matter-contrast" in line or "--lesion-contrast" in line or "--lesion-edge" in line
                   for line in train + test)


def test_lesion_contrast_varies_the_training_hosts_only(tmp_path, capsys, monkeypatch):
    """Test cases keep the default lesion contrast, so builds that differ in it share one yardstick."""
    train, test = _dry_build(tmp_path, capsys, monkeypatch, "--lesion-contrast", "1.15,1.8")
    assert len(train) == 2 and all(line.endswith("--lesion-contrast 1.15 1.8") for line in train)  # and its light part
    assert test and not any("--lesion-contrast" in line for line in test)
    for bad in ("1.8,1.15", "0,1.1", "1.1"):
        with pytest.raises(SystemExit):
            bts.parse_args(["--out", str(tmp_path / "x"), "--lesion-contrast", bad])


def test_lesion_edge_grades_the_training_hosts_only(tmp_path, capsys, monkeypatch):
    """Test cases keep flat lesions, so builds that differ in it share one yardstick."""
    train, test = _dry_build(tmp_path, capsys, monkeypatch, "--lesion-edge", "0.3,0.7")
    assert len(train) == 2 and all(line.endswith("--lesion-edge 0.3 0.7") for line in train)  # and its light part
    assert test and not any("--lesion-edge" in line for line in test)
    assert bts.parse_args(["--out", str(tmp_path), "--lesion-edge", "0,1"]).lesion_edge == (0.0, 1.0)
    for bad in ("0.7,0.3", "-0.1,0.5", "0.5,1.2", "0.5", "a,b"):
        with pytest.raises(SystemExit):
            bts.parse_args(["--out", str(tmp_path / "x"), "--lesion-edge", bad])


def test_grey_matter_contrast_varies_the_training_hosts_only(tmp_path, capsys, monkeypatch):
    assert bts.parse_args(["--out", str(tmp_path), "--grey-matter-contrast", "0.95,1.15"]).grey_matter_contrast == (0.95, 1.15)
    train, test = _dry_build(tmp_path, capsys, monkeypatch, "--grey-matter-contrast", "0.95,1.15")
    assert len(train) == 2 and all(line.endswith("--grey-matter-contrast 0.95 1.15") for line in train)  # and its light part
    assert test and not any("--grey-matter-contrast" in line for line in test)
    for bad in ("1.2,1.1", "0,1.1", "1.1", "a,b"):
        with pytest.raises(SystemExit):
            bts.parse_args(["--out", str(tmp_path / "x"), "--grey-matter-contrast", bad])


def test_fill_needs_the_mni152_template(tmp_path):
    real = tmp_path / "real"
    _touch(real, "host_a.nii.gz")
    template = tmp_path / "template.nii.gz"
    template.write_bytes(b"")
    args = bts.parse_args(["--out", str(tmp_path / "out"), "--real-dir", str(real), "--template", str(template),
                           "--phantoms", "0", "--light-cases-per-host", "0", "--dry-run"])
    with pytest.raises(SystemExit, match="--host-lesions fill needs --template mni152"):
        bts.build(args)
