"""Output layouts (suffix, nnU-Net, BIDS derivatives) and the case id that pairs files across them."""

from __future__ import annotations

import doctest
import json

import pytest

import planar3d.naming as naming
from pathlib import PurePosixPath

from planar3d.naming import (
    MASK_SUFFIX, PROBABILITY_SUFFIX, case_id, is_nifti, layout_output_path, output_path,
    strip_nifti_extension, write_dataset_description,
)


def test_doctests():
    result = doctest.testmod(naming)
    assert result.failed == 0 and result.attempted >= 10


def test_suffix_layout_is_output_path():
    for relative in ["sub-01/anat/flair.nii.gz", "x.nii", "a/case_0000.nii.gz"]:
        for suffix in (MASK_SUFFIX, PROBABILITY_SUFFIX):
            assert layout_output_path(relative, "suffix", suffix) == output_path(relative, suffix)
    assert output_path("sub-01/anat/flair.nii.gz").as_posix() == "sub-01/anat/flair_mask.nii.gz"


def test_nnunet_layout():
    assert layout_output_path("case_0000.nii.gz", "nnunet").as_posix() == "case.nii.gz"
    assert layout_output_path("case_0000.nii.gz", "nnunet", PROBABILITY_SUFFIX).as_posix() == "case_prob.nii.gz"
    # no channel suffix: the stem is kept whole
    assert layout_output_path("d/scan.nii", "nnunet").as_posix() == "d/scan.nii.gz"


def test_bids_layout():
    assert layout_output_path("sub-01/anat/sub-01_FLAIR.nii.gz", "bids").as_posix() == \
        "derivatives/planar3d/sub-01/anat/sub-01_desc-lesion_mask.nii.gz"
    # entities kept in order, an existing desc replaced, run kept
    assert layout_output_path("sub-A/ses-pre/anat/sub-A_ses-pre_run-2_desc-raw_FLAIR.nii", "bids").as_posix() == \
        "derivatives/planar3d/sub-A/ses-pre/anat/sub-A_ses-pre_run-2_desc-lesion_mask.nii.gz"
    with pytest.raises(ValueError, match="flair_head.nii.gz.*BIDS"):
        layout_output_path("flair_head.nii.gz", "bids")
    with pytest.raises(ValueError, match="unknown layout 'nnU-Net'"):
        layout_output_path("x.nii.gz", "nnU-Net")


@pytest.mark.parametrize("image, reference, layouts", [
    ("imagesTr/la_003_0000.nii.gz", "labelsTr/la_003.nii.gz", ("suffix", "nnunet")),
    ("sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz",
     "derivatives/manual/sub-01/ses-1/anat/sub-01_ses-1_label-lesion_mask.nii.gz", ("suffix", "nnunet", "bids")),
    ("images/case_007_flair.nii.gz", "labels/case_007_lesions.nii.gz", ("suffix", "nnunet")),
])
def test_prediction_pairs_with_reference_in_every_layout(image, reference, layouts):
    expected = case_id(image, "image")
    assert case_id(reference, "mask") == expected
    for layout in layouts:
        assert case_id(layout_output_path(image, layout), "mask") == expected, layout


def test_nnunet_label_is_not_a_channel():
    # a label named like an image's case with a 4-digit number must keep it
    assert case_id("labelsTr/BraTS_0001.nii.gz", "mask") == "BraTS_0001"
    assert case_id("imagesTr/BraTS_0001.nii.gz", "image") == "BraTS"
    with pytest.raises(ValueError, match="role"):
        case_id("x.nii.gz", "label")


def test_dataset_description(tmp_path):
    root = tmp_path / "derivatives" / "planar3d"
    path = write_dataset_description(root, version="9.9", source="bids_root")
    assert path == root / "dataset_description.json"
    assert json.loads(path.read_text()) == {
        "Name": "planar3d lesion segmentations", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "planar3d", "Version": "9.9", "Description": "MS lesion masks of FLAIR scans (planar 3D res-u-net)"}],
        "SourceDatasets": [{"URL": "bids_root"}],
    }
    from planar3d import __version__
    assert json.loads(write_dataset_description(root).read_text())["GeneratedBy"][0]["Version"] == __version__
    assert sorted(p.name for p in root.iterdir()) == ["dataset_description.json"]


@pytest.mark.parametrize("name,expected", [("a.nii", True), ("a.NII.GZ", True), ("a.nii.gz", True),
                                           ("a.gz", False), ("a.nii.gz.bak", False), ("nii", False)])
def test_is_nifti(name, expected):
    assert is_nifti(name) is expected


def test_strip_and_output_paths():
    assert strip_nifti_extension("sub-01/anat/flair.nii.gz") == PurePosixPath("sub-01/anat/flair")
    assert strip_nifti_extension("x/Flair.NII") == PurePosixPath("x/Flair")
    assert output_path("sub-01/anat/flair.nii.gz") == PurePosixPath("sub-01/anat/flair_mask.nii.gz")
    assert output_path("flair.nii", PROBABILITY_SUFFIX) == PurePosixPath("flair_prob.nii.gz")
    assert output_path("a.b.nii.gz", MASK_SUFFIX) == PurePosixPath("a.b_mask.nii.gz")
    with pytest.raises(ValueError, match="not a NIfTI file name"):
        strip_nifti_extension("notes.txt")
