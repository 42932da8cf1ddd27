"""Data manifests: which cases a data set has, where their files are, and the cross-validation folds.

A manifest is a JSON file of format ``planar3d-manifest/1``::

    {"format": "planar3d-manifest/1", "dataset": "msseg2016", "description": "...",
     "root": "msseg2016",
     "cases": [{"id": "01016SACH", "image": "01016SACH/3DFLAIR.nii.gz",
                "label": "01016SACH/Consensus.nii.gz", "group": "01",
                "sha256": {"image": null, "label": null}}],
     "folds": [["01042GULE", "07043SEME", "08037ROGU"], ...]}

Keys: ``format``, ``dataset``, ``root`` and ``cases`` are required; ``description`` (text) and
``folds`` (default ``[]``) are optional; other keys are refused. ``root`` is absolute or relative
to the manifest's folder, and can be overridden when loading (``--root``). Case ``image`` and
``label`` paths are relative to the root (``label`` may be null: an unlabeled case); a path with
``..`` or an absolute path outside the root is refused. ``folds`` lists the test case ids of each
fold (index 0 is the first fold); the training cases of a fold are all other labeled cases. A case
may be in at most one fold, and only labeled cases may be in folds. ``sha256`` holds the hex
SHA-256 of each file, or null when unknown (see :func:`hash_manifest`).

Example:
    >>> manifest = load_manifest("data_manifests/msseg2016.json", root="/data/msseg")  # doctest: +SKIP
    >>> [case.id for case in manifest.test_cases(0)]                                    # doctest: +SKIP
    ['01042GULE', '07043SEME', '08037ROGU']
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from planar3d.errors import ConfigError, InputError
from planar3d.io import make_parent_folder, sha256_file, write_json

FORMAT = "planar3d-manifest/1"
_REQUIRED = ("format", "dataset", "root", "cases")
_OPTIONAL = ("description", "folds")
_CASE_REQUIRED = ("id", "image")
_CASE_OPTIONAL = ("label", "group", "sha256")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def _no_hashes() -> dict:
    return {"image": None, "label": None}


@dataclass
class Case:
    """One subject (or session): a FLAIR image and, if known, its lesion mask.

    Attributes:
        id: unique case identifier.
        image: absolute path of the FLAIR volume.
        label: absolute path of the binary lesion mask, or ``None``.
        group: stratification group (e.g. the acquisition center), or ``None``.
        sha256: ``{"image": hex or None, "label": hex or None}``.
    """

    id: str
    image: Path
    label: Optional[Path] = None
    group: Optional[str] = None
    sha256: dict = field(default_factory=_no_hashes)


@dataclass
class Manifest:
    """A data set: its cases under one root folder and its cross-validation folds.

    Attributes:
        dataset: data set name.
        root: absolute folder the case paths are relative to.
        cases: the cases, in file order.
        folds: test case ids of each fold.
        description: free text (provenance, how the folds were made).
        source: the manifest file this was loaded from, if any.
    """

    dataset: str
    root: Path
    cases: list[Case]
    folds: list[list[str]] = field(default_factory=list)
    description: str = ""
    source: Optional[Path] = None

    def _where(self) -> str:
        return str(self.source) if self.source else f"manifest {self.dataset!r}"

    def case(self, case_id: str) -> Case:
        """The case with id ``case_id``; :class:`InputError` if there is none."""
        for case in self.cases:
            if case.id == case_id:
                return case
        raise InputError(self._where(), f"no case with id {case_id!r}")

    def _fold(self, fold: int) -> list[str]:
        if not 0 <= fold < len(self.folds):
            raise InputError(self._where(), f"fold {fold} does not exist (the manifest has {len(self.folds)} folds, 0-based)")
        return self.folds[fold]

    def test_cases(self, fold: int) -> list[Case]:
        """Test cases of fold ``fold`` (0-based), in fold order."""
        return [self.case(case_id) for case_id in self._fold(fold)]

    def train_cases(self, fold: int) -> list[Case]:
        """Training cases of fold ``fold``: every labeled case not tested in it, in file order."""
        tested = set(self._fold(fold))
        return [case for case in self.cases if case.label is not None and case.id not in tested]

    def to_json_dict(self, relative_to: Optional[Path] = None) -> dict:
        """The manifest as JSON data; ``root`` is made relative to ``relative_to`` if given."""
        root = self.root
        if relative_to is not None:
            root = Path(os.path.relpath(self.root, Path(relative_to).resolve()))
        cases = []
        for case in self.cases:
            cases.append(
                {
                    "id": case.id,
                    "image": self._relative(case, case.image),
                    "label": None if case.label is None else self._relative(case, case.label),
                    "group": case.group,
                    "sha256": {"image": case.sha256.get("image"), "label": case.sha256.get("label")},
                }
            )
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "description": self.description,
            "root": root.as_posix(),
            "cases": cases,
            "folds": [list(fold) for fold in self.folds],
        }

    def _relative(self, case: Case, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            raise InputError(self._where(), f"case {case.id!r}: {path} is outside the root {self.root}") from None


def _inside(root: Path, value: str) -> Optional[Path]:
    """``root / value`` if it stays inside ``root`` (lexically), else ``None``.

    The text alone is checked here; :func:`_resolves_inside` then follows symlinks.
    """
    path = PurePosixPath(value.replace("\\", "/"))
    if ".." in path.parts or not value:
        return None
    if path.is_absolute() or Path(value).is_absolute():
        absolute = Path(os.path.normpath(value))
        for base in (root, Path(os.path.normpath(os.path.abspath(root)))):
            try:
                return root / absolute.relative_to(base)
            except ValueError:
                continue
        return None
    return root.joinpath(*path.parts)


def _resolves_inside(root: Path, path: Path) -> bool:
    """False when ``path`` exists and, symlinks followed, lies outside ``root`` (also resolved).

    A link inside the data folder to a file elsewhere would let a manifest read (and a checksum
    or QC picture reveal) any file the user can read; a missing file is reported later.
    """
    if not os.path.lexists(path):
        return True
    resolved, base = path.resolve(), root.resolve()
    return resolved == base or base in resolved.parents


def _check_keys(source: Path, where: str, data: Any, required: tuple, optional: tuple) -> None:
    if not isinstance(data, dict):
        raise InputError(source, f"{where} must be a JSON object")
    missing = [key for key in required if key not in data]
    if missing:
        raise InputError(source, f"{where} is missing key(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise InputError(source, f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")


def _parse_case(source: Path, root: Path, index: int, data: Any) -> Case:
    _check_keys(source, f"cases[{index}]", data, _CASE_REQUIRED, _CASE_OPTIONAL)
    case_id = data["id"]
    if not isinstance(case_id, str) or not case_id:
        raise InputError(source, f"cases[{index}]: 'id' must be a non-empty string")
    paths = {}
    for key in ("image", "label"):
        value = data.get(key)
        if value is None and key == "label":
            paths[key] = None
            continue
        if not isinstance(value, str):
            raise InputError(source, f"case {case_id!r}: {key!r} must be a path string")
        paths[key] = _inside(root, value)
        if paths[key] is None:
            raise InputError(source, f"case {case_id!r}: {key} path {value!r} escapes the root {root}")
        if not _resolves_inside(root, paths[key]):
            raise InputError(source, f"case {case_id!r}: {key} path {value!r} is a symlink (or under one) "
                                     f"that resolves to {paths[key].resolve()}, outside the root {root}")
    hashes = data.get("sha256") or {}
    if not isinstance(hashes, dict) or set(hashes) - {"image", "label"}:
        raise InputError(source, f"case {case_id!r}: 'sha256' must be an object with keys 'image' and 'label'")
    for key, value in hashes.items():
        if value is not None and not (isinstance(value, str) and _HEX.match(value)):
            raise InputError(source, f"case {case_id!r}: sha256 of {key} is not a 64-digit lowercase hex string")
    group = data.get("group")
    if group is not None and not isinstance(group, str):
        raise InputError(source, f"case {case_id!r}: 'group' must be a string or null")
    return Case(case_id, paths["image"], paths["label"], group, {"image": hashes.get("image"), "label": hashes.get("label")})


def _check_folds(source: Path, cases: list[Case], folds: Any) -> list[list[str]]:
    if not isinstance(folds, list) or not all(isinstance(fold, list) for fold in folds):
        raise InputError(source, "'folds' must be a list of lists of case ids")
    by_id = {case.id: case for case in cases}
    seen: dict[str, int] = {}
    for number, fold in enumerate(folds):
        for case_id in fold:
            if case_id not in by_id:
                raise InputError(source, f"folds[{number}] names unknown case {case_id!r}")
            if case_id in seen:
                raise InputError(source, f"case {case_id!r} is in folds[{seen[case_id]}] and folds[{number}]")
            if by_id[case_id].label is None:
                raise InputError(source, f"folds[{number}] names case {case_id!r}, which has no label")
            seen[case_id] = number
    return [list(fold) for fold in folds]


def manifest_from_dict(data: Any, source: Path, root: Optional[str | os.PathLike] = None) -> Manifest:
    """Validate JSON data of a manifest read from ``source`` (used for error messages and ``root``)."""
    source = Path(source)
    _check_keys(source, "the manifest", data, _REQUIRED, _OPTIONAL)
    if data["format"] != FORMAT:
        raise InputError(source, f"unknown format {data['format']!r} (expected {FORMAT!r})")
    if root is None:
        if not isinstance(data["root"], str):
            raise InputError(source, "'root' must be a path string")
        root = data["root"]
    root_path = (source.parent.resolve() / Path(root).expanduser()).resolve()
    if not isinstance(data["cases"], list):
        raise InputError(source, "'cases' must be a list")
    cases = [_parse_case(source, root_path, index, item) for index, item in enumerate(data["cases"])]
    ids: set[str] = set()
    for case in cases:
        if case.id in ids:
            raise InputError(source, f"duplicate case id {case.id!r}")
        ids.add(case.id)
    folds = _check_folds(source, cases, data.get("folds", []))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise InputError(source, "'description' must be a string")
    return Manifest(str(data["dataset"]), root_path, cases, folds, description, source)


def load_manifest(path: str | os.PathLike, root: Optional[str | os.PathLike] = None) -> Manifest:
    """Read and validate a manifest file.

    Args:
        path: the JSON file.
        root: data folder overriding the file's ``root`` (relative to the current folder).

    Raises:
        InputError: unreadable file, bad JSON, unknown format, missing or unknown keys, duplicate
            ids, a fold naming an unknown or unlabeled case, a case in two folds, or a path that
            escapes the root; the message names the file and the key or case.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a readable JSON file ({error})") from None
    if root is not None:
        root = Path(root).resolve()
    return manifest_from_dict(data, path, root)


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write ``manifest`` atomically (creating its folder); the root is written relative to it."""
    path = make_parent_folder(path)
    write_json(path, manifest.to_json_dict(relative_to=path.parent))


def merge_manifests(manifests: list[Manifest], dataset: str) -> Manifest:
    """One manifest holding the cases of several (e.g. phantoms and lesion-injected real scans).

    Case ids become ``<dataset>_<id>`` (the source manifest's data set name; ``<index>_<id>``
    when two share a name), the root is the deepest folder holding every source root, and fold
    ``k`` tests the union of the sources' folds ``k`` (a source with fewer folds adds nothing
    to the later ones).

    Raises:
        InputError: no manifests given.
    """
    if not manifests:
        raise InputError(dataset, "no manifests to merge")
    names = [m.dataset for m in manifests]
    prefixes = [name if names.count(name) == 1 else f"{n}" for n, name in enumerate(names)]
    root = Path(os.path.commonpath([str(m.root) for m in manifests]))
    cases, folds = [], [[] for _ in range(max(len(m.folds) for m in manifests))]
    for prefix, manifest in zip(prefixes, manifests):
        for case in manifest.cases:
            cases.append(Case(f"{prefix}_{case.id}", case.image, case.label, case.group, dict(case.sha256)))
        for k, fold in enumerate(manifest.folds):
            folds[k].extend(f"{prefix}_{case_id}" for case_id in fold)
    description = "merged from " + "; ".join(f"{m.dataset} ({m.source or m.root})" for m in manifests)
    return Manifest(dataset, root, cases, folds, description)


def _files(case: Case) -> list[tuple[str, Path]]:
    return [("image", case.image)] + ([("label", case.label)] if case.label is not None else [])


def hash_manifest(manifest: Manifest) -> Manifest:
    """A copy of ``manifest`` with the SHA-256 of every image and label filled in.

    Raises:
        InputError: a file is missing or unreadable.
    """
    cases = []
    for case in manifest.cases:
        hashes = _no_hashes()
        for key, path in _files(case):
            try:
                hashes[key] = sha256_file(path)
            except OSError as error:
                raise InputError(path, f"case {case.id!r}: cannot read {key} ({error.strerror or error})") from None
        cases.append(dataclasses.replace(case, sha256=hashes))
    return dataclasses.replace(manifest, cases=cases)


def verify_case(case: Case) -> list[str]:
    """Problems of one case: missing files and checksum mismatches (recorded checksums only)."""
    problems = []
    for key, path in _files(case):
        if not path.is_file():
            problems.append(f"case {case.id}: {key} {path}: file not found")
            continue
        expected = case.sha256.get(key)
        if expected is not None:
            actual = sha256_file(path)
            if actual != expected:
                problems.append(f"case {case.id}: {key} {path}: sha256 mismatch (expected {expected}, got {actual})")
    return problems


def verify_manifest(manifest: Manifest) -> list[str]:
    """Problems of all cases (see :func:`verify_case`); an empty list means all is well."""
    return [problem for case in manifest.cases for problem in verify_case(case)]


# --- building a manifest from a folder ------------------------------------------------------------

LAYOUTS = ("auto", "msseg", "nnunet", "bids")
_MSSEG_NAMES = (("3DFLAIR", "Consensus"), ("FLAIR", "consensus_gt"))
_BIDS_LABEL_WORDS = ("mask", "lesion", "label", "dseg")


def _nifti(folder: Path, stem: str) -> Optional[Path]:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists."""
    for extension in (".nii.gz", ".nii"):
        if (folder / (stem + extension)).is_file():
            return folder / (stem + extension)
    return None


def _msseg_cases(folder: Path) -> list[Case]:
    cases = []
    for subject in sorted(p for p in folder.iterdir() if p.is_dir()):
        for image_stem, label_stem in _MSSEG_NAMES:
            image = _nifti(subject, image_stem)
            if image is not None:
                group = subject.name[:2] if image_stem == "3DFLAIR" else None
                cases.append(Case(subject.name, image, _nifti(subject, label_stem), group))
                break
    return cases


def _nnunet_cases(folder: Path) -> list[Case]:
    cases = []
    for image in sorted((folder / "imagesTr").glob("*_0000.nii*")):
        case_id = re.sub(r"_0000\.nii(\.gz)?$", "", image.name)
        cases.append(Case(case_id, image, _nifti(folder / "labelsTr", case_id)))
    return cases


def _bids_label(folder: Path, image: Path, prefix: str) -> Optional[Path]:
    relative = image.parent.relative_to(folder)
    found = []
    for pipeline in sorted((folder / "derivatives").glob("*")):
        for candidate in sorted((pipeline / relative).glob(prefix + "_*.nii*")):
            lower = candidate.name.lower()
            if any(word in lower for word in _BIDS_LABEL_WORDS):
                found.append(candidate)
    if len(found) > 1:
        raise InputError(image, f"several label candidates in derivatives: {', '.join(str(p) for p in found)}")
    return found[0] if found else None


def _bids_cases(folder: Path) -> list[Case]:
    images = sorted(folder.glob("sub-*/anat/*_FLAIR.nii*")) + sorted(folder.glob("sub-*/ses-*/anat/*_FLAIR.nii*"))
    cases = []
    for image in sorted(images):
        prefix = re.sub(r"_FLAIR\.nii(\.gz)?$", "", image.name)
        cases.append(Case(prefix, image, _bids_label(folder, image, prefix)))
    return cases


def _detect_layout(folder: Path) -> str:
    if (folder / "imagesTr").is_dir():
        return "nnunet"
    if any(p.is_dir() for p in folder.glob("sub-*")):
        return "bids"
    return "msseg"


def stratified_folds(cases: list[Case], num_folds: int, seed: int = 0) -> list[list[str]]:
    """Deterministic folds of the labeled cases, stratified by group.

    Algorithm: groups are taken in sorted order (``None`` first); the ids of each group are
    sorted, then shuffled with one ``numpy.random.default_rng(seed)`` generator shared by all
    groups, and dealt to the folds in turn, the deal continuing across groups where the previous
    group stopped. Each fold so tests ``floor`` or ``ceil`` of ``n_group / num_folds`` cases of
    every group, and fold sizes differ by at most one. Within a fold, ids are sorted.

    Args:
        cases: the cases; unlabeled ones are left out of the folds.
        num_folds: number of folds (0 gives no folds).
        seed: shuffling seed.

    Raises:
        ConfigError: ``num_folds`` is negative or larger than the number of labeled cases.
    """
    import numpy as np

    labeled = [case for case in cases if case.label is not None]
    if num_folds < 0 or num_folds > len(labeled):
        raise ConfigError(f"cannot make {num_folds} folds from {len(labeled)} labeled cases")
    if num_folds == 0:
        return []
    groups: dict[str, list[str]] = {}
    for case in labeled:
        groups.setdefault(case.group or "", []).append(case.id)
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    turn = 0
    for group in sorted(groups):
        ids = sorted(groups[group])
        for index in rng.permutation(len(ids)):
            folds[turn % num_folds].append(ids[index])
            turn += 1
    return [sorted(fold) for fold in folds]


def build_manifest(
    folder: str | os.PathLike,
    layout: str = "auto",
    dataset: Optional[str] = None,
    num_folds: int = 5,
    seed: int = 0,
    description: str = "",
) -> Manifest:
    """Make a manifest of the cases found in ``folder``.

    Layouts (``auto`` picks ``nnunet`` if ``imagesTr/`` exists, ``bids`` if ``sub-*`` folders
    exist, else ``msseg``; ``.nii`` is accepted wherever ``.nii.gz`` is):

    - ``msseg``: ``<id>/3DFLAIR.nii.gz`` with optional ``<id>/Consensus.nii.gz`` (MSSEG 2016;
      group = first two characters of the id, the center), or ``<id>/FLAIR.nii.gz`` with optional
      ``<id>/consensus_gt.nii.gz`` (MSLUB raw layout; no group).
    - ``nnunet``: ``imagesTr/<id>_0000.nii.gz`` with optional ``labelsTr/<id>.nii.gz``.
    - ``bids``: ``sub-*/[ses-*/]anat/<prefix>_FLAIR.nii.gz`` (id = prefix, e.g. ``sub-01_ses-1``);
      label = the one file ``derivatives/<any>/<same folders>/<prefix>_*.nii.gz`` whose name
      contains ``mask``, ``lesion``, ``label`` or ``dseg``.

    Folds come from :func:`stratified_folds`. Checksums are left empty (see :func:`hash_manifest`).

    Raises:
        InputError: the folder does not exist, holds no case, or a BIDS label is ambiguous.
        ConfigError: unknown layout or too many folds.
    """
    folder = Path(folder).resolve()
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    if layout == "auto":
        layout = _detect_layout(folder)
    cases = {"msseg": _msseg_cases, "nnunet": _nnunet_cases, "bids": _bids_cases}[layout](folder)
    if not cases:
        raise InputError(folder, f"no case found in the {layout} layout")
    folds = stratified_folds(cases, num_folds, seed)
    if not description:
        description = f"Built from {layout} layout; {num_folds} folds stratified by group, seed {seed}."
    return Manifest(dataset or folder.name, folder, cases, folds, description)
