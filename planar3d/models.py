"""Which trained planar3d models are on this machine: ``planar3d models`` lists them.

A model is a ``planar3d-model/1`` checkpoint (:data:`planar3d.checkpoint.MODEL_FORMAT`): a run
folder's ``best.pt``/``last.pt``, an export's ``models/model.pt``, or a file in a cache folder.
:func:`list_models` looks under the folders given and the default cache folders
(:func:`default_search_roots`), reads each ``*.pt`` with the safe loader and reports what a user
needs to choose one: path, SHA-256, time, network width, threshold and intensity normalisation.
Files that are not planar3d models are reported apart, with the reason.

Example:
    >>> found = list_models(["runs"])                                   # doctest: +SKIP
    >>> [(row.path.name, row.width, row.threshold) for row in found.models]   # doctest: +SKIP
    [('best.pt', 0.125, 0.45)]
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from planar3d.checkpoint import MODEL_FORMAT, load_checkpoint
from planar3d.errors import WeightsError
from planar3d.io import sha256_file

#: File name endings of checkpoints looked at.
CHECKPOINT_SUFFIXES = (".pt", ".pth")


@dataclass(frozen=True)
class ModelRow:
    """One planar3d model file.

    Attributes:
        path: the file.
        sha256: hex SHA-256 of the file.
        modified: the file's modification time, UTC, ISO 8601 to the second (checkpoints record no time).
        width: the network's channel multiplier (``network.width``).
        threshold: the probability threshold chosen on validation.
        normalization: the intensity normalisation method (``normalization.method``).
        epoch: the training epoch it was saved at (None when not recorded).
        resumable: it holds training state (``last.pt``), not only the model.
    """

    path: Path
    sha256: str
    modified: str
    width: Optional[float]
    threshold: Optional[float]
    normalization: Optional[str]
    epoch: Optional[int]
    resumable: bool


@dataclass
class ModelListing:
    """Models found (sorted by path) and ``(path, reason)`` of the other checkpoint files seen."""

    models: List[ModelRow] = field(default_factory=list)
    others: List[tuple] = field(default_factory=list)


def default_search_roots() -> List[Path]:
    """The cache folders looked in by default: the torch hub folder (``$TORCH_HOME/hub``,
    default ``~/.cache/torch/hub``) and planar3d's own (``$XDG_CACHE_HOME/planar3d``, default
    ``~/.cache/planar3d``)."""
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path(torch.hub.get_dir()), cache / "planar3d"]


def _checkpoint_files(roots: Iterable[Path]) -> List[Path]:
    files = set()
    for root in roots:
        if root.is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = [p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        else:
            continue
        files.update(p.resolve() for p in candidates if p.is_file() and p.name.lower().endswith(CHECKPOINT_SUFFIXES))
    return sorted(files)


def model_row(path: str | os.PathLike) -> ModelRow:
    """The row of one checkpoint file.

    Raises:
        WeightsError: not readable by the safe loader, or not a ``planar3d-model/1`` checkpoint.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, expected_format=MODEL_FORMAT)
    network = checkpoint.get("network") or {}
    normalization = checkpoint.get("normalization") or {}
    training = checkpoint.get("training") or {}
    modified = _dt.datetime.fromtimestamp(path.stat().st_mtime, tz=_dt.timezone.utc).replace(microsecond=0)
    threshold = checkpoint.get("threshold")
    width = network.get("width")
    epoch = training.get("epoch")
    return ModelRow(
        path=path,
        sha256=sha256_file(path),
        modified=modified.isoformat(),
        width=float(width) if width is not None else None,
        threshold=float(threshold) if threshold is not None else None,
        normalization=normalization.get("method"),
        epoch=int(epoch) if epoch is not None else None,
        resumable="resume" in checkpoint,
    )


def list_models(search_roots: Optional[Sequence[str | os.PathLike]] = None, include_defaults: bool = True) -> ModelListing:
    """Every planar3d model under ``search_roots`` (recursive) and, by default, the cache folders.

    Args:
        search_roots: folders (run folders, a runs folder, an export) or checkpoint files.
        include_defaults: also look in :func:`default_search_roots`.

    Returns:
        :class:`ModelListing`; a ``.pt``/``.pth`` file that is not a planar3d model (ImageNet
        VGG-16 weights in the torch cache, a damaged file) is in ``others`` with the reason.
    """
    roots = [Path(root) for root in (search_roots or [])]
    if include_defaults:
        roots += default_search_roots()
    listing = ModelListing()
    for path in _checkpoint_files(roots):
        try:
            listing.models.append(model_row(path))
        except WeightsError as error:
            listing.others.append((path, error.problem))
    return listing
