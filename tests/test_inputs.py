"""Input selection: FLAIR only from BIDS, nnU-Net and plain folders; masks and labels never taken."""

from __future__ import annotations

import doctest
import json

import planar3d.inputs as inputs
from planar3d.inputs import select_flair_inputs


def _touch(root, *relatives):
    for relative in relatives:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # selection reads names only


def _reasons(selection, root):
    return {item.path.relative_to(root).as_posix(): item.reason for item in selection.skipped}


def test_doctests():
    assert doctest.testmod(inputs).failed == 0


def test_bids_root(tmp_path):
    root = tmp_path / "bids"
    _touch(root, "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_FLAIR.nii.gz",
           "sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii", "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz",
           "derivatives/manual/sub-01/anat/sub-01_label-lesion_mask.nii.gz",
           "derivatives/planar3d/sub-01/anat/sub-01_desc-lesion_mask.nii.gz",
           "sub-01/anat/sub-01_FLAIR.json", "sub-01/anat/.sub-01_FLAIR.nii.gz.tmp.nii.gz")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    selection = select_flair_inputs(root)
    assert selection.convention == "bids"
    assert [p.relative_to(root).as_posix() for p in selection.selected] == [
        "sub-01/anat/sub-01_FLAIR.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii"]
    assert _reasons(selection, root) == {
        "derivatives/manual/sub-01/anat/sub-01_label-lesion_mask.nii.gz": "under derivatives/ (outputs and manual labels, not scans)",
        "derivatives/planar3d/sub-01/anat/sub-01_desc-lesion_mask.nii.gz": "under derivatives/ (outputs and manual labels, not scans)",
        "sub-01/anat/.sub-01_FLAIR.nii.gz.tmp.nii.gz": "hidden file",
        "sub-01/anat/sub-01_T1w.nii.gz": "BIDS dataset: not a FLAIR (suffix T1w)",
        "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz": "BIDS dataset: not a FLAIR (suffix T2w)",
    }


def test_bids_root_without_description_is_found_by_sub_folders(tmp_path):
    _touch(tmp_path, "sub-x/anat/sub-x_FLAIR.nii.gz", "sub-x/anat/sub-x_T1w.nii.gz")
    selection = select_flair_inputs(tmp_path)
    assert (selection.convention, [p.name for p in selection.selected]) == ("bids", ["sub-x_FLAIR.nii.gz"])


def test_nnunet_folders(tmp_path):
    _touch(tmp_path, "imagesTr/la_001_0000.nii.gz", "imagesTr/la_001_0001.nii.gz", "imagesTr/la_002_0000.nii.gz",
           "imagesTr/la_002_0001.nii.gz", "labelsTr/la_001.nii.gz", "labelsTr/la_002.nii.gz")
    selection = select_flair_inputs(tmp_path)
    assert selection.convention == "nnunet"
    assert [p.name for p in selection.selected] == ["la_001_0000.nii.gz", "la_002_0000.nii.gz"]
    assert _reasons(selection, tmp_path) == {
        "imagesTr/la_001_0001.nii.gz": "nnU-Net channel 0001 (only channel 0000, the FLAIR, is read)",
        "imagesTr/la_002_0001.nii.gz": "nnU-Net channel 0001 (only channel 0000, the FLAIR, is read)",
        "labelsTr/la_001.nii.gz": "under labelsTr/ (nnU-Net labels, not scans)",
        "labelsTr/la_002.nii.gz": "under labelsTr/ (nnU-Net labels, not scans)",
    }
    # the imagesTs folder itself as input: a name without a channel is reported, not taken
    _touch(tmp_path, "imagesTs/a_0000.nii.gz", "imagesTs/notes.nii.gz")
    selection = select_flair_inputs(tmp_path / "imagesTs")
    assert [p.name for p in selection.selected] == ["a_0000.nii.gz"]
    assert [s.reason for s in selection.skipped] == ["nnU-Net folder: no channel suffix (_0000)"]


def test_plain_folder_takes_every_scan_but_masks(tmp_path):
    _touch(tmp_path, "flair_head_1mm.nii.gz", "scan.nii", "scan_2019.nii.gz", "out/scan_mask.nii.gz",
           "scan_prob.nii.gz", "case_000_lesions.nii.gz", "seg/x_dseg.nii.gz", "Labels.nii.gz", "y_seg.nii")
    selection = select_flair_inputs(tmp_path)
    assert selection.convention == "plain"
    assert [p.relative_to(tmp_path).as_posix() for p in selection.selected] == [
        "flair_head_1mm.nii.gz", "scan.nii", "scan_2019.nii.gz"]
    assert _reasons(selection, tmp_path) == {
        "Labels.nii.gz": "a label or mask name ('label')",
        "case_000_lesions.nii.gz": "a label or mask name ('_lesion')",
        "out/scan_mask.nii.gz": "a label or mask name (ends in '_mask')",
        "scan_prob.nii.gz": "a label or mask name (ends in '_prob')",
        "seg/x_dseg.nii.gz": "a label or mask name (ends in '_dseg')",
        "y_seg.nii": "a label or mask name (ends in '_seg')",
    }


def test_numbered_plain_names_are_not_nnunet(tmp_path):
    # four-digit endings without any _0000 are years or ids, not channels
    _touch(tmp_path, "scan_2019.nii.gz", "scan_2020.nii.gz")
    selection = select_flair_inputs(tmp_path)
    assert (selection.convention, len(selection.selected)) == ("plain", 2)


def test_pattern_and_exclude(tmp_path):
    _touch(tmp_path, "sub-01/anat/sub-01_FLAIR.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz", "other/sub-01_FLAIR_mask.nii.gz",
           "out/sub-09_FLAIR.nii.gz")
    selection = select_flair_inputs(tmp_path, pattern="*FLAIR*", exclude=tmp_path / "out")
    assert selection.convention == "pattern"
    assert [p.name for p in selection.selected] == ["sub-01_FLAIR.nii.gz"]  # the mask matches but is never taken
    assert _reasons(selection, tmp_path) == {
        "other/sub-01_FLAIR_mask.nii.gz": "a label or mask name (ends in '_mask')",
        "out/sub-09_FLAIR.nii.gz": "inside the output folder",
        "sub-01/anat/sub-01_T1w.nii.gz": "does not match --pattern '*FLAIR*'",
    }
    by_path = select_flair_inputs(tmp_path, pattern="sub-01/*/*.nii.gz")
    assert [p.name for p in by_path.selected] == ["sub-01_FLAIR.nii.gz", "sub-01_T1w.nii.gz"]
    assert str(by_path.skipped[0]).endswith("a label or mask name (ends in '_mask')")
