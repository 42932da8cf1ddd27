"""Tests of `planar3d synth` and planar3d.data.synth."""

import hashlib
import json

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from pipelines.cli import app
from planar3d.data.phantom import make_phantom_parts

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["synth", *map(str, args)])


def test_synth_writes_manifest_files_and_is_byte_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    result = _run("--out", a, "--cases", 4, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(a / "manifest.json")
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["format"] == "planar3d-manifest/1"
    assert manifest["dataset"] == "synthetic" and manifest["root"] == "."
    assert manifest["description"].startswith("planar3d synth seed=3")
    assert [e["id"] for e in manifest["cases"]] == ["case_000", "case_001", "case_002", "case_003"]
    assert [e["group"] for e in manifest["cases"]] == ["3d-RAS", "thick-RAS", "3d-LPS", "thick-LPS"]
    assert manifest["folds"] == [["case_000"], ["case_001"], ["case_002"], ["case_003"]]
    for entry in manifest["cases"]:
        for key in ("image", "label"):
            data = (a / entry[key]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"][key]
        image, label = nib.load(str(a / entry["image"])), nib.load(str(a / entry["label"]))
        axcodes = "".join(nib.aff2axcodes(image.affine))
        assert entry["group"].endswith(axcodes)
        assert image.header["qform_code"] == 1 and image.header["sform_code"] == 1
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    assert not list(a.rglob(".*tmp"))
    assert _run("--out", b, "--cases", 4, "--seed", 3).exit_code == 0
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert _run("--out", c, "--cases", 4, "--seed", 4).exit_code == 0
    other = json.loads((c / "manifest.json").read_text())
    assert other["cases"][0]["sha256"] != manifest["cases"][0]["sha256"]


def test_synth_folds_round_robin_five(tmp_path):
    result = _run("--out", tmp_path, "--cases", 7, "--seed", 0, "--geometry", "3d", "--orientation", "LAS")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["folds"] == [["case_000", "case_005"], ["case_001", "case_006"], ["case_002"], ["case_003"], ["case_004"]]
    assert {e["group"] for e in manifest["cases"]} == {"3d-LAS"}


def test_synth_brain_extracted_fraction_leaves_other_cases_unchanged(tmp_path):
    raw, mixed = tmp_path / "raw", tmp_path / "mixed"
    assert _run("--out", raw, "--cases", 4, "--seed", 0, "--geometry", "3d").exit_code == 0
    result = _run("--out", mixed, "--cases", 4, "--seed", 0, "--geometry", "3d", "--brain-extracted", 0.5)
    assert result.exit_code == 0, result.output
    a = json.loads((raw / "manifest.json").read_text())["cases"]
    b = json.loads((mixed / "manifest.json").read_text())["cases"]
    stripped = [y["group"].endswith("-brain") for y in b]
    assert any(stripped) and not all(stripped)
    for x, y, is_stripped in zip(a, b, stripped):
        assert (x["sha256"] == y["sha256"]) != is_stripped
        assert x["sha256"]["label"] == y["sha256"]["label"]  # same lesions either way
        if is_stripped:
            image = np.asarray(nib.load(str(mixed / y["image"])).dataobj)
            assert (image == 0).mean() > 0.5  # background, skull and scalp are exactly 0
    assert _run("--out", tmp_path / "bad", "--cases", 1, "--brain-extracted", 1.5).exit_code != 0


def _host_and_masks(tmp_path):
    """A small phantom host (LAS) with its lesion label, and a folder of three 4x4x4 masks."""
    p = make_phantom_parts(np.random.default_rng(5), size="small", orientation="LAS", lesion_load=0.002)
    host, label = tmp_path / "host.nii.gz", tmp_path / "host_lesions.nii.gz"
    nib.save(nib.Nifti1Image(p.flair, p.affine), host)
    nib.save(nib.Nifti1Image(p.lesions, p.affine), label)
    masks = tmp_path / "masks"
    masks.mkdir()
    for n, center in enumerate([(30, 28, 26), (36, 36, 22), (26, 36, 30)]):
        m = np.zeros(p.flair.shape, np.uint8)
        m[tuple(slice(c - 2, c + 2) for c in center)] = 1
        nib.save(nib.Nifti1Image(m, p.affine), masks / f"p{n}_lesions.nii.gz")
    return p, host, label, masks


def test_synth_with_host_injects_mask_subsets(tmp_path):
    p, host, label, masks = _host_and_masks(tmp_path)
    out = tmp_path / "out"
    result = _run("--out", out, "--cases", 3, "--seed", 1, "--host", host, "--host-label", label, "--lesion-masks", masks)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["cases"]:
        assert entry["group"] == f"host-{host.name.split('.')[0]}-LAS"  # the host's name: hosts.host_key
        lab = np.asarray(nib.load(str(out / entry["label"])).dataobj)
        assert np.all(lab[p.lesions > 0] == 1) and lab.sum() > p.lesions.sum()
        img = np.asarray(nib.load(str(out / entry["image"])).dataobj)
        np.testing.assert_array_equal(img[lab == 0], p.flair[lab == 0])
    single = tmp_path / "single"
    result = _run("--out", single, "--cases", 4, "--seed", 1, "--host", host, "--lesion-masks", masks, "--max-masks-per-case", 1)
    assert result.exit_code == 0, result.output
    manifest = json.loads((single / "manifest.json").read_text())
    assert "max_masks_per_case=1" in manifest["description"]
    for entry in manifest["cases"]:
        lab = np.asarray(nib.load(str(single / entry["label"])).dataobj)
        assert lab.sum() == 4 ** 3  # one 4x4x4 mask, no host label


def test_lesion_edge_grades_the_injected_lesions_only(tmp_path):
    """--lesion-edge changes no label and no voxel outside the lesions; inside, the graded cases
    are dimmer than the flat ones of the same seed (whose cases are otherwise the same), and the
    manifest records the range."""
    p, host, _, masks = _host_and_masks(tmp_path)
    common = ("--cases", 2, "--seed", 3, "--host", host, "--lesion-masks", masks)
    assert _run("--out", tmp_path / "flat", *common).exit_code == 0
    result = _run("--out", tmp_path / "graded", *common, "--lesion-edge", 0.3, 0.3)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "graded" / "manifest.json").read_text())
    assert "lesion_edge=0.3-0.3" in manifest["description"]
    for entry in manifest["cases"]:
        flat_label, graded_label = (np.asarray(nib.load(str(tmp_path / d / entry["label"])).dataobj) for d in ("flat", "graded"))
        np.testing.assert_array_equal(graded_label, flat_label)
        flat, graded = (np.asarray(nib.load(str(tmp_path / d / entry["image"])).dataobj) for d in ("flat", "graded"))
        inside = graded_label > 0
        np.testing.assert_array_equal(graded[~inside], flat[~inside])
        assert np.all(graded[inside] <= flat[inside]) and np.any(graded[inside] < flat[inside])


def test_case_lesion_load_is_over_the_brain_mask_sidecar_else_the_non_zero_image(tmp_path):
    from planar3d.data.synth import brain_mask_path, case_lesion_load

    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    image, label = tmp_path / "images" / "c_flair.nii.gz", tmp_path / "labels" / "c_lesions.nii.gz"
    for folder in (image.parent, label.parent, brain_mask_path(image).parent):
        folder.mkdir()
    flair = np.zeros((10, 10, 10), np.float32)
    flair[:, :, :5] = 1.0  # 500 non-zero voxels
    lesions = np.zeros((10, 10, 10), np.uint8)
    lesions[0, 0, :2] = 1
    nib.save(nib.Nifti1Image(flair, affine), image)
    nib.save(nib.Nifti1Image(lesions, affine), label)
    assert case_lesion_load(image, label) == 2 / 500
    brain = np.zeros((10, 10, 10), np.uint8)
    brain[:4] = 1  # 400 voxels
    nib.save(nib.Nifti1Image(brain, affine), brain_mask_path(image))
    assert case_lesion_load(image, label) == 2 / 400


def test_synth_errors_exit_1_with_message(tmp_path):
    result = _run("--out", tmp_path, "--cases", 2, "--geometry", "2d")
    assert result.exit_code == 1
    assert "geometries" in result.output and str(tmp_path) in result.output
    result = _run("--out", tmp_path, "--cases", 2, "--host", tmp_path / "missing.nii.gz", "--lesion-masks", tmp_path)
    assert result.exit_code == 1 and "missing.nii.gz" in result.output
    # --host-lesions: an unknown mode, and fill without the template whose prior it needs
    result = _run("--out", tmp_path, "--cases", 1, "--host-lesions", "inpaint")
    assert result.exit_code == 1 and "host_lesions must be one of keep, fill, label, got 'inpaint'" in result.output
    result = _run("--out", tmp_path, "--cases", 1, "--host-lesions", "fill")
    assert result.exit_code == 1 and "host_lesions 'fill' needs a host FLAIR and template 'mni152'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # --grey-matter-contrast: needs a host and the mni152 template, and two numbers
    result = _run("--out", tmp_path, "--cases", 1, "--grey-matter-contrast", 0.9, 1.1)
    assert result.exit_code == 1 and "grey_matter_contrast needs a host FLAIR and template 'mni152'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _run("--out", tmp_path, "--cases", 1, "--grey-matter-contrast", 0.9).exit_code != 0
    # --lesion-contrast: needs a host, and low <= high
    result = _run("--out", tmp_path, "--cases", 1, "--lesion-contrast", 1.2, 1.6)
    assert result.exit_code == 1 and "lesion_contrast needs a host FLAIR" in result.output
    assert len(result.output.strip().splitlines()) == 1
    host = tmp_path / "host.nii.gz"
    host.write_bytes(b"")  # the range is checked before the host is read
    result = _run("--out", tmp_path, "--cases", 1, "--host", host, "--lesion-masks", tmp_path, "--lesion-contrast", 1.6, 1.2)
    assert result.exit_code == 1 and "lesion_contrast must be 0 < low <= high, got (1.6, 1.2)" in result.output
    # --lesion-edge: needs a host, and 0 <= low <= high <= 1
    result = _run("--out", tmp_path, "--cases", 1, "--lesion-edge", 0.3, 0.6)
    assert result.exit_code == 1 and "lesion_edge needs a host FLAIR" in result.output
    assert len(result.output.strip().splitlines()) == 1
    for bad in ((0.6, 0.3), (0.5, 1.5), (-0.1, 0.5)):
        result = _run("--out", tmp_path, "--cases", 1, "--host", host, "--lesion-masks", tmp_path, "--lesion-edge", *bad)
        assert result.exit_code == 1 and f"lesion_edge must be 0 <= low <= high <= 1, got {bad}" in result.output
