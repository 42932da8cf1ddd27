"""Which NIfTI files of a folder are FLAIR scans to segment, and why the others are not.

A folder given to ``predict`` may be a BIDS dataset (T1w, FLAIR, manual masks under
``derivatives/``), an nnU-Net ``imagesTs`` folder (one file per channel, ``case_0000`` is the
first) or a plain folder of scans. :func:`select_flair_inputs` takes, in that order of checks:

1. never a mask, label or probability map: a name ending in ``_mask``, ``_prob``, ``_probseg``,
   ``_seg``, ``_dseg`` (or holding ``_lesion`` or ``label``), nor anything under ``derivatives/``
   or an nnU-Net ``labelsTr``/``labelsTs`` folder, nor hidden files, nor the output folder;
2. with a ``pattern`` (a glob on the file name, or on the path relative to the folder when it
   holds ``/``): exactly the files it matches;
3. in a BIDS dataset (``dataset_description.json`` or ``sub-*`` folders at the root): only
   ``*_FLAIR.nii[.gz]``;
4. when every remaining name carries an nnU-Net channel (``_0000``, ``_0001``, ...) and one is
   ``_0000``, or the folder is ``imagesTr``/``imagesTs``: only channel ``0000``;
5. otherwise (a plain folder: ``flair_head_1mm.nii.gz``, ``scan.nii``): every remaining file.

Every file not taken is reported with the reason, so a run can say what it left out.

Example:
    >>> selection = select_flair_inputs("bids_root")                    # doctest: +SKIP
    >>> selection.convention, [p.name for p in selection.selected]      # doctest: +SKIP
    ('bids', ['sub-01_FLAIR.nii.gz'])
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import List, Optional, Tuple

from planar3d.naming import bids_entities, is_nifti, nnunet_channel, strip_nifti_extension

#: Name endings (lower-case stem) of files that are outputs or labels, never inputs.
MASK_ENDINGS = ("_mask", "_prob", "_probseg", "_seg", "_dseg")
#: Substrings (lower-case stem) of label files: ``*_lesion*`` (planar3d synth ``_lesions``), ``*label*``.
MASK_SUBSTRINGS = ("_lesion", "label")
#: Folder names whose content is never an input.
LABEL_FOLDERS = ("derivatives", "labelsTr", "labelsTs")
#: nnU-Net image folders: their files are channels even when a name looks otherwise.
NNUNET_IMAGE_FOLDERS = ("imagesTr", "imagesTs")
#: The channel nnU-Net data sets use for the first modality; planar3d reads FLAIR from it.
FLAIR_CHANNEL = 0
CONVENTIONS = ("pattern", "bids", "nnunet", "plain")


@dataclass(frozen=True)
class Skipped:
    """A NIfTI file left out, and why (one line)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class InputSelection:
    """The files taken (sorted) and those left out, with the convention that decided."""

    selected: List[Path] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    convention: str = "plain"


def label_reason(relative: PurePosixPath) -> Optional[str]:
    """Why a file (path relative to the input folder) is a label/mask and not a scan, else None.

    Example:
        >>> label_reason(PurePosixPath("derivatives/manual/sub-01/anat/sub-01_FLAIR.nii.gz"))
        'under derivatives/ (outputs and manual labels, not scans)'
        >>> label_reason(PurePosixPath("images/case_000_lesions.nii.gz"))
        "a label or mask name ('_lesion')"
        >>> label_reason(PurePosixPath("flair_head_1mm.nii.gz")) is None
        True
    """
    for folder in relative.parts[:-1]:
        if folder in LABEL_FOLDERS:
            return f"under {folder}/ (outputs and manual labels, not scans)" if folder == "derivatives" \
                else f"under {folder}/ (nnU-Net labels, not scans)"
    stem = strip_nifti_extension(relative.name).name.lower()
    for ending in MASK_ENDINGS:
        if stem.endswith(ending):
            return f"a label or mask name (ends in {ending!r})"
    for part in MASK_SUBSTRINGS:
        if part in stem:
            return f"a label or mask name ({part!r})"
    return None


def is_bids_root(folder: str | os.PathLike) -> bool:
    """A BIDS dataset root: it holds ``dataset_description.json`` or a ``sub-*`` folder."""
    folder = Path(folder)
    if (folder / "dataset_description.json").is_file():
        return True
    return any(child.is_dir() and child.name.startswith("sub-") for child in folder.iterdir())


def _matches(pattern: str, relative: PurePosixPath) -> bool:
    target = relative.as_posix() if "/" in pattern else relative.name
    return fnmatch.fnmatchcase(target, pattern)


def select_flair_inputs(
    folder: str | os.PathLike,
    pattern: Optional[str] = None,
    exclude: Optional[str | os.PathLike] = None,
) -> InputSelection:
    """The FLAIR scans of ``folder`` (recursive) by the rules of the module docstring.

    Args:
        folder: the input folder.
        pattern: a glob (``fnmatch``, case-sensitive) on the file name, or on the relative path
            when it holds ``/``; when given, the BIDS and nnU-Net conventions are not applied.
        exclude: a folder whose files are never inputs (the output folder inside ``folder``).

    Returns:
        :class:`InputSelection`; non-NIfTI files are neither selected nor reported.
    """
    root = Path(folder)
    skip_dir = Path(exclude).resolve() if exclude is not None else None
    selection = InputSelection()
    candidates: List[Tuple[Path, PurePosixPath]] = []
    for file in sorted(root.rglob("*")):
        if not is_nifti(file) or not file.is_file():
            continue
        relative = PurePosixPath(file.relative_to(root).as_posix())
        reason = None
        if any(part.startswith(".") for part in relative.parts):
            reason = "hidden file"
        elif skip_dir is not None and skip_dir in file.resolve().parents:
            reason = "inside the output folder"
        else:
            reason = label_reason(relative)
        if reason is not None:
            selection.skipped.append(Skipped(file, reason))
        else:
            candidates.append((file, relative))

    def take(keep, reason_of):
        for file, relative in candidates:
            if keep(relative):
                selection.selected.append(file)
            else:
                selection.skipped.append(Skipped(file, reason_of(relative)))

    def stem(relative: PurePosixPath) -> str:
        return strip_nifti_extension(relative.name).name

    if pattern is not None:
        selection.convention = "pattern"
        take(lambda r: _matches(pattern, r), lambda r: f"does not match --pattern {pattern!r}")
    elif is_bids_root(root):
        selection.convention = "bids"

        def bids_suffix(relative: PurePosixPath) -> Optional[str]:
            parsed = bids_entities(stem(relative))
            return parsed[1] if parsed is not None else None

        take(lambda r: bids_suffix(r) == "FLAIR",
             lambda r: f"BIDS dataset: not a FLAIR (suffix {bids_suffix(r)})" if bids_suffix(r) else "BIDS dataset: not a BIDS name")
    else:
        channels = [nnunet_channel(stem(relative)) for _, relative in candidates]
        in_image_folder = root.name in NNUNET_IMAGE_FOLDERS
        all_channels = bool(candidates) and all(channels) and any(c[1] == FLAIR_CHANNEL for c in channels if c)
        if in_image_folder or all_channels:
            selection.convention = "nnunet"

            def channel(relative: PurePosixPath) -> Optional[int]:
                found = nnunet_channel(stem(relative))
                return found[1] if found else None

            take(lambda r: channel(r) == FLAIR_CHANNEL,
                 lambda r: f"nnU-Net channel {channel(r):04d} (only channel {FLAIR_CHANNEL:04d}, the FLAIR, is read)"
                 if channel(r) is not None else "nnU-Net folder: no channel suffix (_0000)")
        else:
            selection.convention = "plain"
            take(lambda r: True, lambda r: "")
    selection.selected.sort()
    selection.skipped.sort(key=lambda item: item.path)
    return selection
