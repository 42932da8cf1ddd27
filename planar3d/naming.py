"""How output files are named from input files.

A prediction mirrors the input's path relative to the input root, with the NIfTI extension
replaced by a suffix: ``sub-01/anat/flair.nii.gz`` gives ``sub-01/anat/flair_mask.nii.gz``
(and ``flair_prob.nii.gz`` for the probability map). Evaluation uses the same rule to find the
prediction of a reference case, so the two never disagree.
"""

from __future__ import annotations

from pathlib import PurePath

MASK_SUFFIX = "_mask"
PROBABILITY_SUFFIX = "_prob"
NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def is_nifti(path: str | PurePath) -> bool:
    """True for file names ending in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    name = PurePath(path).name.lower()
    return name.endswith(NIFTI_EXTENSIONS)


def strip_nifti_extension(path: str | PurePath) -> PurePath:
    """``a/b.nii.gz`` -> ``a/b``; raises ValueError for a path that is not NIfTI."""
    path = PurePath(path)
    lower = path.name.lower()
    for extension in NIFTI_EXTENSIONS:
        if lower.endswith(extension):
            return path.with_name(path.name[: -len(extension)])
    raise ValueError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")


def output_path(relative_image: str | PurePath, suffix: str = MASK_SUFFIX) -> PurePath:
    """Relative output path for an input image: same folders, ``<stem><suffix>.nii.gz``."""
    stem = strip_nifti_extension(relative_image)
    return stem.with_name(stem.name + suffix + ".nii.gz")
