"""Output file names mirror the input's relative path."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from planar3d.naming import MASK_SUFFIX, PROBABILITY_SUFFIX, is_nifti, output_path, strip_nifti_extension


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
