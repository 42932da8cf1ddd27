"""How output files are named from input files.

A prediction mirrors the input's path relative to the input root, with the NIfTI extension
replaced by a suffix: ``sub-01/anat/flair.nii.gz`` gives ``sub-01/anat/flair_mask.nii.gz``
(and ``flair_prob.nii.gz`` for the probability map). Evaluation uses the same rule to find the
prediction of a reference case, so the two never disagree.

Other layouts (:func:`layout_output_path`): nnU-Net's ``case.nii.gz`` and BIDS derivatives.
:func:`case_id` gives an input, its prediction (any layout) and its reference one id.
"""

from __future__ import annotations

import re
from pathlib import PurePath, PurePosixPath

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


# --- output layouts and case ids ----------------------------------------------------------------
#
# Three conventions users already know name the same prediction differently; one case id ties
# them together so evaluation can pair a prediction with its reference whatever the layout.

#: ``--layout`` values: planar3d's own ``<stem>_mask``, nnU-Net's ``case.nii.gz``, BIDS derivatives.
LAYOUTS = ("suffix", "nnunet", "bids")
#: Where a BIDS-layout prediction goes, relative to the output folder (the BIDS root).
BIDS_DERIVATIVE_ROOT = PurePosixPath("derivatives/planar3d")
#: BIDS version the derivative's ``dataset_description.json`` declares.
BIDS_VERSION = "1.9.0"
#: BIDS name endings of the two outputs (label before desc: the BIDS entity order).
BIDS_OUTPUT_ENDINGS = {MASK_SUFFIX: ("desc-lesion", "mask"), PROBABILITY_SUFFIX: ("label-lesion", "probseg")}
#: Entities that describe a derivative rather than the scan; dropped from case ids.
BIDS_DERIVATIVE_ENTITIES = ("desc", "label")

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_BIDS_ENTITY = re.compile(r"^(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)$")
#: Name endings of masks, labels and probability maps (compared lower-case): never inputs, and
#: removed (with what precedes them being an image name) when a case id is taken from a mask.
MASK_NAME_ENDINGS = ("_mask", "_prob", "_probseg", "_seg", "_dseg", "_lesions", "_lesion", "_labels", "_label")
#: Image-modality endings removed from image names for the case id (planar3d synth: ``case_000_flair``).
IMAGE_NAME_ENDINGS = ("_flair",)


def nnunet_channel(stem: str) -> tuple[str, int] | None:
    """``("case", 0)`` for an nnU-Net image stem ``case_0000``; None when it has no channel suffix.

    Example:
        >>> nnunet_channel("BraTS_0001_0000"), nnunet_channel("case_000_flair")
        (('BraTS_0001', 0), None)
    """
    match = _NNUNET_CHANNEL.match(stem)
    return (match["case"], int(match["channel"])) if match else None


def bids_entities(stem: str) -> tuple[list[tuple[str, str]], str | None] | None:
    """``(entities, suffix)`` of a BIDS file stem, or None when the name is not BIDS (no ``sub-``).

    Example:
        >>> bids_entities("sub-01_ses-1_acq-3d_FLAIR")
        ([('sub', '01'), ('ses', '1'), ('acq', '3d')], 'FLAIR')
        >>> bids_entities("case_0000") is None
        True
    """
    parts = stem.split("_")
    suffix = None
    if parts and not _BIDS_ENTITY.match(parts[-1]):
        suffix = parts.pop()
    matches = [_BIDS_ENTITY.match(part) for part in parts]
    if not parts or not all(matches) or matches[0]["key"] != "sub":  # type: ignore[index]
        return None
    return [(match["key"], match["value"]) for match in matches], suffix  # type: ignore[index]


def _strip_ending(stem: str, endings: tuple[str, ...]) -> tuple[str, bool]:
    lower = stem.lower()
    for ending in endings:
        if lower.endswith(ending) and len(stem) > len(ending):
            return stem[: -len(ending)], True
    return stem, False


def case_id(path: str | PurePath, role: str = "image") -> str:
    """The case a file belongs to, the same for an input, its prediction and its reference.

    Args:
        path: a NIfTI file name (folders are ignored).
        role: ``"image"`` for an input scan, ``"mask"`` for a prediction, reference label or
            probability map. It matters for nnU-Net only: an image ``case_0000`` carries a channel
            suffix, a label ``case`` does not (``BraTS_0001`` is a label, not channel 1 of ``BraTS``).

    Rules, in order: BIDS names keep their entities minus ``desc``/``label`` (suffix dropped);
    otherwise a mask ending (``_mask``, ``_prob``, ``_lesions``, ...) is removed, and an image name
    (an input, or what precedes a mask ending) loses a ``_flair`` ending and the nnU-Net channel.

    Examples:
        >>> case_id("imagesTr/BraTS_0001_0000.nii.gz"), case_id("labelsTr/BraTS_0001.nii.gz", "mask")
        ('BraTS_0001', 'BraTS_0001')
        >>> case_id("BraTS_0001_0000_mask.nii.gz", "mask")          # suffix layout of an nnU-Net input
        'BraTS_0001'
        >>> case_id("sub-01_ses-1_FLAIR.nii.gz"), case_id("sub-01_ses-1_desc-lesion_mask.nii.gz", "mask")
        ('sub-01_ses-1', 'sub-01_ses-1')
        >>> case_id("images/case_000_flair.nii.gz"), case_id("labels/case_000_lesions.nii.gz", "mask")
        ('case_000', 'case_000')
        >>> case_id("case_000_flair_mask.nii.gz", "mask"), case_id("flair_head_1mm.nii.gz")
        ('case_000', 'flair_head_1mm')
    """
    if role not in ("image", "mask"):
        raise ValueError(f"role must be 'image' or 'mask', not {role!r}")
    stem = strip_nifti_extension(PurePath(path).name).name
    bids = bids_entities(stem)
    if bids is not None:
        entities, _ = bids
        return "_".join(f"{key}-{value}" for key, value in entities if key not in BIDS_DERIVATIVE_ENTITIES)
    is_image = role == "image"
    if not is_image:
        stem, is_image = _strip_ending(stem, MASK_NAME_ENDINGS)
    if is_image:
        stem, _ = _strip_ending(stem, IMAGE_NAME_ENDINGS)
        channel = nnunet_channel(stem)
        if channel is not None:
            stem = channel[0]
    return stem


def layout_output_path(relative_image: str | PurePath, layout: str = "suffix", suffix: str = MASK_SUFFIX) -> PurePath:
    """Relative output path of an input image in one of :data:`LAYOUTS`.

    ``suffix`` mirrors the input (:func:`output_path`); ``nnunet`` keeps the folders and names the
    mask ``<case>.nii.gz`` (channel suffix removed; other outputs ``<case><suffix>.nii.gz``);
    ``bids`` writes a BIDS derivative under :data:`BIDS_DERIVATIVE_ROOT`: the input's entities,
    its suffix (``FLAIR``) dropped, ``desc-lesion_mask`` (or ``label-lesion_probseg``) added.

    Raises:
        ValueError: unknown layout; ``bids`` with a name that is not BIDS (``sub-<label>_...``).

    Examples:
        >>> layout_output_path("imagesTs/BraTS_0001_0000.nii.gz", "nnunet").as_posix()
        'imagesTs/BraTS_0001.nii.gz'
        >>> layout_output_path("sub-01/ses-1/anat/sub-01_ses-1_acq-3d_FLAIR.nii.gz", "bids").as_posix()
        'derivatives/planar3d/sub-01/ses-1/anat/sub-01_ses-1_acq-3d_desc-lesion_mask.nii.gz'
        >>> layout_output_path("sub-02_FLAIR.nii", "bids", PROBABILITY_SUFFIX).as_posix()
        'derivatives/planar3d/sub-02/anat/sub-02_label-lesion_probseg.nii.gz'
        >>> layout_output_path("a/scan_0000.nii", "suffix").as_posix()
        'a/scan_0000_mask.nii.gz'
    """
    relative_image = PurePath(relative_image)
    if layout == "suffix":
        return output_path(relative_image, suffix)
    if layout == "nnunet":
        case = case_id(relative_image, "image")
        return relative_image.with_name(case + ("" if suffix == MASK_SUFFIX else suffix) + ".nii.gz")
    if layout == "bids":
        stem = strip_nifti_extension(relative_image.name).name
        parsed = bids_entities(stem)
        if parsed is None:
            raise ValueError(f"{relative_image}: the bids layout needs BIDS names (sub-<label>[_ses-<label>]..._FLAIR.nii.gz)")
        entities = [(key, value) for key, value in parsed[0] if key not in BIDS_DERIVATIVE_ENTITIES]
        entity, bids_suffix = BIDS_OUTPUT_ENDINGS.get(suffix, (f"desc-lesion{suffix.replace('_', '')}", "mask"))
        folder = BIDS_DERIVATIVE_ROOT / f"sub-{entities[0][1]}"
        session = dict(entities).get("ses")
        if session is not None:
            folder = folder / f"ses-{session}"
        name = "_".join([f"{key}-{value}" for key, value in entities] + [entity, bids_suffix]) + ".nii.gz"
        return PurePath(folder / "anat" / name)
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def dataset_description(version: str | None = None, source: str | None = None) -> dict:
    """The ``dataset_description.json`` of planar3d's BIDS derivative (``DatasetType: derivative``).

    Args:
        version: planar3d version recorded in ``GeneratedBy`` (default: this package's).
        source: optional URI/path of the raw dataset (``SourceDatasets``).

    Example:
        >>> d = dataset_description("1.2.3")
        >>> d["DatasetType"], d["GeneratedBy"][0]["Name"], d["GeneratedBy"][0]["Version"]
        ('derivative', 'planar3d', '1.2.3')
    """
    if version is None:
        from planar3d import __version__ as version
    description = {
        "Name": "planar3d lesion segmentations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "planar3d", "Version": version,
                         "Description": "MS lesion masks of FLAIR scans (planar 3D res-u-net)"}],
    }
    if source is not None:
        description["SourceDatasets"] = [{"URL": source}]
    return description


def write_dataset_description(derivative_root: str | PurePath, version: str | None = None, source: str | None = None) -> PurePath:
    """Write ``derivative_root/dataset_description.json`` atomically (folder created); return its path."""
    from pathlib import Path

    from planar3d.io import write_json  # planar3d.io imports this module: import at call time

    path = Path(derivative_root) / "dataset_description.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dataset_description(version, source))
    return path


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
