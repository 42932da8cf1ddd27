"""Saving and loading checkpoints, and the one owner of the ``planar3d-model/1`` format.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so the safe loader
(``torch.load(weights_only=True)``) reads it and no pickled code ever runs. A reader never sees a
half-written file: it is written to a temp file in the same folder and renamed.

:class:`ModelCheckpoint` is the trained-model format: training builds one, prediction, export
and the benchmarks read one, and nothing else touches the dict behind it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from planar3d.errors import WeightsError
from planar3d.io import atomic_write, make_parent_folder
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3
from planar3d.networks.res_unet import PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (parent folders are created)."""
    path = make_parent_folder(path)
    with atomic_write(path, "wb") as stream:
        torch.save(checkpoint, stream)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_checkpoint(path: str | Path, expected_format: Optional[str] = None) -> dict:
    """Read a checkpoint dict with the safe loader; errors name the file and the problem.

    Args:
        path: the file.
        expected_format: when given, the dict's ``"format"`` entry must equal it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise WeightsError(path, f"cannot be read as a PyTorch checkpoint ({_first_line(error)})") from None
    except Exception as error:  # pickle.UnpicklingError: unsafe or corrupted content
        raise WeightsError(path, f"refused by the safe loader ({_first_line(error)})") from None
    if expected_format is not None and (not isinstance(checkpoint, dict) or checkpoint.get("format") != expected_format):
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(path, f"not a {expected_format} checkpoint (found {found!r})")
    return checkpoint


MODEL_FORMAT = "planar3d-model/1"
DEFAULT_OVERLAP = 0.25
#: Entries added to ``planar3d-model/1`` after the first checkpoints were written, with the value
#: those checkpoints were trained and predicted with.
_ADDED_LATER: Dict[str, Any] = {
    "orientation": "RAS",
    "inference": {"roi_size": None, "overlap": DEFAULT_OVERLAP},
    "training": {},
}


@dataclass
class ModelCheckpoint:
    """A trained model: weights plus everything prediction needs to repeat training's steps.

    Attributes:
        state_dict: the network's weights (may be empty for stand-in models in tests).
        network: the network's shape.
        normalization: intensity scaling the network was trained with.
        threshold: probability threshold chosen on validation, in (0, 1).
        min_lesion_size: mm³; prediction drops the 6-connected components of at most this
            volume, chosen on validation with the threshold (3, MSSEG's rule, for checkpoints
            written before that choice).
        core_threshold: prediction also drops the components whose highest probability is at
            most this (hysteresis), chosen on validation with the threshold; ``None`` (checkpoints
            without the choice): none is dropped for it.
        roi_size: sliding-window size per axis (-1: whole axis), or ``None`` when training
            validated on whole volumes; prediction then uses slabs along the plane axis.
        overlap: window overlap fraction in [0, 1).
        orientation: axis codes of the arrays the network saw (always ``"RAS"``, see
            :class:`planar3d.preprocess.Reorientation`).
        training: provenance: the training config, ``epoch``, ``metrics``, ``encoder_source``,
            ``manifest_sha256``, ``seed``, ``versions``.
        resume: ``last.pt`` only: optimiser, schedule and RNG states to continue training.
    """

    state_dict: Dict[str, torch.Tensor]
    network: PlanarResUNetConfig
    normalization: NormalizationConfig = NormalizationConfig()
    threshold: float = 0.5
    roi_size: Optional[Tuple[int, int, int]] = None
    overlap: float = DEFAULT_OVERLAP
    orientation: str = "RAS"
    training: Dict[str, Any] = field(default_factory=dict)
    resume: Optional[Dict[str, Any]] = None
    min_lesion_size: float = MIN_LESION_SIZE_MM3
    core_threshold: Optional[float] = None

    FORMAT = MODEL_FORMAT

    def __post_init__(self):
        self.validate()

    def validate(self, source: str | Path = "checkpoint") -> None:
        """Raise :class:`WeightsError` (naming ``source``) for a value prediction cannot use."""
        problems = []
        if not isinstance(self.state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in self.state_dict.values()):
            problems.append("state_dict is not a dict of tensors")
        if not 0.0 < float(self.threshold) < 1.0:
            problems.append(f"threshold {self.threshold} is not in (0, 1)")
        if not float(self.min_lesion_size) >= 0.0:
            problems.append(f"min_lesion_size {self.min_lesion_size} is not >= 0 mm³")
        if self.core_threshold is not None and not 0.0 <= float(self.core_threshold) < 1.0:
            problems.append(f"core_threshold {self.core_threshold} is not in [0, 1)")
        if self.roi_size is not None and (len(self.roi_size) != 3 or any(int(r) == 0 or int(r) < -1 for r in self.roi_size)):
            problems.append(f"roi_size {list(self.roi_size)} is not 3 positive sizes or -1")
        if not 0.0 <= float(self.overlap) < 1.0:
            problems.append(f"overlap {self.overlap} is not in [0, 1)")
        if self.orientation != "RAS":
            problems.append(f"orientation {self.orientation!r} is not 'RAS'")
        if problems:
            raise WeightsError(source, "invalid planar3d-model/1 checkpoint: " + "; ".join(problems))

    # --- dict form --------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The ``weights_only``-loadable dict written to disk."""
        data: Dict[str, Any] = {
            "format": MODEL_FORMAT,
            "state_dict": self.state_dict,
            "network": self.network.to_dict(),
            "normalization": self.normalization.to_dict(),
            "orientation": self.orientation,
            "threshold": float(self.threshold),
            "inference": {"roi_size": None if self.roi_size is None else [int(r) for r in self.roi_size],
                          "overlap": float(self.overlap), "min_lesion_size": float(self.min_lesion_size),
                          "core_threshold": None if self.core_threshold is None else float(self.core_threshold)},
            "training": self.training,
        }
        if self.resume is not None:
            data["resume"] = self.resume
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "checkpoint") -> "ModelCheckpoint":
        """Validate a loaded dict (upgrading one written before entries were added).

        Raises:
            WeightsError: naming ``source``: not a planar3d checkpoint, or a bad entry.
        """
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise WeightsError(source, f"not a planar3d checkpoint (expected format {MODEL_FORMAT!r}, found {found!r})")
        data = upgrade(data)
        missing = [key for key in ("state_dict", "network", "normalization", "threshold") if key not in data]
        if missing:
            raise WeightsError(source, f"invalid planar3d-model/1 checkpoint: missing {', '.join(missing)}")
        try:
            network = PlanarResUNetConfig.from_dict(data["network"])
            normalization = NormalizationConfig.from_dict(data["normalization"])
            inference = data["inference"]
            roi_size = inference.get("roi_size")
            checkpoint = cls(
                state_dict=data["state_dict"], network=network, normalization=normalization,
                threshold=float(data["threshold"]),
                min_lesion_size=float(inference.get("min_lesion_size", MIN_LESION_SIZE_MM3)),
                core_threshold=None if inference.get("core_threshold") is None else float(inference["core_threshold"]),
                roi_size=None if roi_size is None else tuple(int(r) for r in roi_size),  # type: ignore[arg-type]
                overlap=float(inference["overlap"]), orientation=data["orientation"],
                training=data["training"], resume=data.get("resume"),
            )
        except WeightsError as error:
            raise WeightsError(source, error.problem) from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise WeightsError(source, f"invalid planar3d-model/1 checkpoint ({_first_line(error)})") from None
        return checkpoint

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write atomically (parent folders are created)."""
        save_checkpoint(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "ModelCheckpoint":
        """Read and validate a ``planar3d-model/1`` file with the safe loader.

        Raises:
            WeightsError: ``"PATH: not a planar3d checkpoint ..."`` for a missing, unreadable or
                foreign file; ``"PATH: invalid planar3d-model/1 checkpoint ..."`` for a bad entry.
        """
        try:
            data = load_checkpoint(path)
        except WeightsError as error:  # the loader's reason without PyTorch's long explanation
            raise WeightsError(path, f"not a planar3d checkpoint ({error.problem.split(' (')[0]})") from None
        return cls.from_dict(data, path)

    # --- use --------------------------------------------------------------------------------

    def without_resume(self) -> "ModelCheckpoint":
        return replace(self, resume=None)

    def build_network(self, device: str | torch.device = "cpu", source: str | Path = "checkpoint"):
        """The network with these weights, in eval mode on ``device``.

        Raises:
            WeightsError: the weights do not fit the network described.
        """
        from planar3d.networks import PlanarResUNet

        try:
            model = PlanarResUNet(self.network)
            model.load_state_dict(self.state_dict, strict=True)
        except (KeyError, ValueError, RuntimeError) as error:
            raise WeightsError(source, f"checkpoint does not describe a loadable network ({_first_line(error)})") from None
        return model.to(device).eval()


def upgrade(data: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a ``planar3d-model/1`` dict with the entries added later filled in.

    A normalisation without ``method`` was trained with ``"percentile"`` (the dataclass default).
    """
    upgraded = dict(data)
    for key, value in _ADDED_LATER.items():
        upgraded.setdefault(key, value)
    inference = dict(upgraded["inference"] or {})
    for key, value in _ADDED_LATER["inference"].items():
        inference.setdefault(key, value)
    upgraded["inference"] = inference
    return upgraded


def load_model(path: str | Path, device: str = "cpu"):
    """Build the network stored in a ``planar3d-model/1`` checkpoint and load its weights.

    Returns:
        ``(model in eval mode on device, ModelCheckpoint)``.
    """
    checkpoint = ModelCheckpoint.load(path)
    return checkpoint.build_network(device, path), checkpoint
