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


def display_path(path: object) -> str:
    r"""``path`` as text safe for one console or log line: control characters are escaped.

    A file name may hold a newline or an escape sequence; printed raw it could forge a log line
    or rewrite the terminal. Backslashes are doubled so that the escaping cannot be faked.

    Example:
        >>> display_path("scans/evil\nerror: forged.nii.gz")
        'scans/evil\\nerror: forged.nii.gz'
        >>> display_path("a\x1b[2Jb\\c")
        'a\\x1b[2Jb\\\\c'
    """
    text = str(path)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        else:
            escaped = repr(char)[1:-1]  # '\n', '\t', '\x1b', '\u2028'...
            out.append(escaped if escaped != char else f"\\u{ord(char):04x}")
    return "".join(out)


def output_collisions(relative_images: "list[PurePath]", suffix: str = MASK_SUFFIX) -> "list[tuple[PurePath, PurePath]]":
    """Pairs of inputs whose outputs would be the same file.

    ``scan.nii`` and ``scan.nii.gz`` both give ``scan_mask.nii.gz``; names differing only in case
    give one file on a case-insensitive disk (macOS, Windows, many network shares). Either way the
    last one written would silently win, so both must be refused before any work.

    Example:
        >>> output_collisions([PurePath("a/scan.nii"), PurePath("a/scan.nii.gz"), PurePath("b.nii")])
        [(PurePosixPath('a/scan.nii'), PurePosixPath('a/scan.nii.gz'))]
    """
    first: dict = {}
    pairs = []
    for relative in relative_images:
        key = output_path(relative, suffix).as_posix().casefold()
        if key in first:
            pairs.append((first[key], relative))
        else:
            first[key] = relative
    return pairs
