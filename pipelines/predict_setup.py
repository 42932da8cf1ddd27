"""What a prediction run is given, checked before any work: settings, device, checkpoint file, scans.

- :class:`InferenceSettings`: everything the per-scan steps need besides the model, taken from a
  ``planar3d-model/1`` checkpoint with the command line's overrides;
- :func:`resolve_device` and :func:`resolve_checkpoint`: ``--device`` and ``--model`` as given;
- :func:`find_scans` / :func:`find_inputs`: the scans of a folder, a file or a manifest fold
  (FLAIR only, sorted), :func:`shard` for ``num_parts``/``part_id``, and :func:`check_layout`,
  which refuses inputs an output layout cannot name or that would share one output.

The per-scan steps are in :mod:`pipelines.predict_steps`, the batch in
:mod:`pipelines.predict_batch`; :mod:`pipelines.predict` is the public entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple

from planar3d.checkpoint import ModelCheckpoint
from planar3d.errors import ConfigError, InputError, WeightsError
from planar3d.inputs import Skipped, select_flair_inputs
from planar3d.io import MAX_IMAGE_BYTES, display_path
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3
from planar3d.naming import is_nifti, layout_output_path
from planar3d.preprocess import NormalizationConfig

#: Window meaning "the whole volume in one pass, or slabs along the plane axis when memory requires".
WHOLE_VOLUME = (-1, -1, -1)
#: Window overlap used when the checkpoint gives none.
DEFAULT_OVERLAP = 0.25


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceSettings:
    """Everything the per-scan steps (:mod:`pipelines.predict_steps`) need besides the model, from a
    checkpoint and overrides.

    Attributes:
        normalization: intensity scaling parameters (as in training).
        plane_axis: the network's plane axis (in RAS array order).
        in_channels: input channels of the network (3: the grey volume repeated).
        threshold: probability threshold.
        roi_size: window per axis (-1 = whole axis).
        overlap: window overlap fraction.
        flip_axes: axes flipped for TTA (empty: no TTA).
        min_lesion_size: components of at most this volume (mm³) are removed.
        core_threshold: components whose highest probability is at most this are removed
            (hysteresis; ``None``: none is).
        sw_batch_size: windows per forward pass.
        device: torch device string.
        precision: ``"fp32"`` or ``"bf16"`` (resolved by :func:`planar3d.inference.resolve_precision`).
        max_image_bytes: largest image accepted (see :func:`planar3d.io.load_image`).
        brain_mask: ``None``, or how each scan's brain mask is made (:data:`planar3d.brain_mask.BRAIN_MASK_SOURCES`):
            predicted lesions mostly outside it are removed.
        grey_matter_max: ``None``, or (with ``brain_mask``) the grey-matter probability above
            which a voxel counts as grey matter: predicted lesions mostly in grey matter are
            removed (:mod:`planar3d.brain_mask`).
    """

    normalization: NormalizationConfig = NormalizationConfig()
    plane_axis: int = 2
    in_channels: int = 1
    threshold: float = 0.5
    roi_size: Tuple[int, int, int] = WHOLE_VOLUME
    overlap: float = DEFAULT_OVERLAP
    flip_axes: Tuple[int, ...] = ()
    min_lesion_size: float = MIN_LESION_SIZE_MM3
    core_threshold: Optional[float] = None
    sw_batch_size: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    max_image_bytes: int = MAX_IMAGE_BYTES
    brain_mask: Optional[str] = None
    grey_matter_max: Optional[float] = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: ModelCheckpoint,
        threshold: Optional[float] = None,
        roi_size: Optional[Sequence[int]] = None,
        overlap: Optional[float] = None,
        tta: bool = False,
        min_lesion_size: Optional[float] = None,
        sw_batch_size: int = 1,
        device: str = "cpu",
        precision: str = "auto",
        core_threshold: Optional[float] = None,
        brain_mask: Optional[str] = None,
        grey_matter_max: Optional[float] = None,
    ) -> "InferenceSettings":
        """Settings of a :class:`planar3d.checkpoint.ModelCheckpoint`; arguments not None override it.

        A checkpoint without a window size, or with whole-plane slabs, gets :data:`WHOLE_VOLUME`
        (one pass, or slabs along the plane axis when memory requires).

        Raises:
            ConfigError: a value out of range (threshold outside (0, 1), roi_size not 3 values...).
        """
        plane_axis = int(checkpoint.network.plane_axis)
        if roi_size is None:
            from planar3d.inference import inference_window

            roi_size = inference_window(checkpoint.roi_size, plane_axis) or WHOLE_VOLUME
        roi_size = tuple(int(r) for r in roi_size)
        if len(roi_size) != 3 or any(r == 0 or r < -1 for r in roi_size):
            raise ConfigError(f"roi_size must be 3 positive sizes or -1 (whole axis), got {roi_size}")
        overlap = checkpoint.overlap if overlap is None else overlap
        if not 0.0 <= float(overlap) < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        threshold = checkpoint.threshold if threshold is None else threshold
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        min_lesion_size = checkpoint.min_lesion_size if min_lesion_size is None else min_lesion_size
        if not float(min_lesion_size) >= 0:
            raise ConfigError(f"min_lesion_size must be >= 0 mm³, got {min_lesion_size}")
        core_threshold = checkpoint.core_threshold if core_threshold is None else core_threshold
        if core_threshold is not None and not 0.0 <= float(core_threshold) < 1.0:
            raise ConfigError(f"core_threshold must be in [0, 1), got {core_threshold}")
        from planar3d.brain_mask import BRAIN_MASK_SOURCES

        if brain_mask is not None and brain_mask not in BRAIN_MASK_SOURCES:
            raise ConfigError(f"brain_mask must be one of {', '.join(BRAIN_MASK_SOURCES)} (or none), got {brain_mask!r}")
        from planar3d.brain_mask import check_grey_matter_max

        try:
            grey_matter_max = check_grey_matter_max(grey_matter_max)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if grey_matter_max is not None and brain_mask is None:
            raise ConfigError("grey_matter_max needs brain_mask mni152: the grey matter comes from the same registered template")
        from planar3d.inference import resolve_precision

        try:
            precision = resolve_precision(precision, device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls(
            normalization=checkpoint.normalization,
            plane_axis=plane_axis,
            in_channels=int(checkpoint.network.in_channels),
            threshold=float(threshold),
            roi_size=roi_size,  # type: ignore[arg-type]
            overlap=float(overlap),
            flip_axes=tuple(axis for axis in range(3) if axis != plane_axis) if tta else (),
            min_lesion_size=float(min_lesion_size),
            core_threshold=None if core_threshold is None else float(core_threshold),
            sw_batch_size=int(sw_batch_size),
            device=str(device),
            precision=precision,
            brain_mask=brain_mask,
            grey_matter_max=grey_matter_max,
        )


def resolve_device(device: Optional[str]) -> str:
    """``"auto"`` (or None): ``"cuda"`` when torch sees a CUDA device, else ``"cpu"``; other values as given.

    Raises:
        ConfigError: not auto, cpu or cuda[:N], or cuda asked for where torch sees none.
    """
    import torch

    device = "auto" if device is None else str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but torch sees no CUDA device (use --device auto or cpu)")
    return device


def resolve_checkpoint(model_path: str | os.PathLike) -> Path:
    """A checkpoint file, or ``RUN/best.pt`` (else ``RUN/last.pt``) of a run folder.

    Raises:
        WeightsError: nothing usable at ``model_path``.
    """
    path = Path(model_path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise WeightsError(path, "run folder has neither best.pt nor last.pt")
    if not path.is_file():
        raise WeightsError(path, "no such checkpoint file or run folder")
    return path


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanInput:
    """One scan to predict: its file and its path relative to the input root (for the outputs)."""

    path: Path
    relative: PurePosixPath


def find_inputs(
    inputs: str | os.PathLike,
    fold: Optional[int] = None,
    root: Optional[str | os.PathLike] = None,
    exclude: Optional[str | os.PathLike] = None,
    pattern: Optional[str] = None,
) -> List[ScanInput]:
    """The scans of :func:`find_scans` (without the files left out)."""
    return find_scans(inputs, fold, root, exclude, pattern)[0]


def find_scans(
    inputs: str | os.PathLike,
    fold: Optional[int] = None,
    root: Optional[str | os.PathLike] = None,
    exclude: Optional[str | os.PathLike] = None,
    pattern: Optional[str] = None,
) -> Tuple[List[ScanInput], List[Skipped]]:
    """The scans of a folder (FLAIR only, sorted), a single NIfTI file, or a manifest JSON, and
    the NIfTI files of a folder left out with the reason.

    A folder's files are chosen by :func:`planar3d.inputs.select_flair_inputs`: never a mask or
    label (``*_mask``, ``*_seg``, ``*lesion*``, ``derivatives/``, ``labelsTr/``...), only
    ``*_FLAIR`` in a BIDS dataset, only channel ``_0000`` in an nnU-Net folder, or exactly the
    files matching ``pattern``.

    Args:
        inputs: folder, ``.nii``/``.nii.gz`` file, or ``planar3d-manifest/1`` JSON.
        fold: with a manifest, only that fold's test cases (0-based); else all cases.
        root: with a manifest, the data folder overriding its root.
        exclude: a folder whose files are never inputs (the output folder, if inside ``inputs``).
        pattern: with a folder, a glob on file names (or relative paths when it holds ``/``).

    Raises:
        InputError: missing input, no scans found, ``fold``/``root`` without a manifest,
            ``pattern`` without a folder.
    """
    path = Path(inputs)
    left_out: List[Skipped] = []
    if pattern is not None and not path.is_dir():
        raise InputError(path, "--pattern selects files of a folder; this input is not a folder")
    is_manifest = path.is_file() and path.name.lower().endswith(".json")
    if (fold is not None or root is not None) and not is_manifest:
        raise InputError(path, "a fold or data root need a manifest JSON as input")
    if is_manifest:
        from planar3d.data.manifest import load_manifest

        manifest = load_manifest(path, root=root)
        cases = manifest.cases if fold is None else manifest.test_cases(fold)
        found = [ScanInput(case.image, PurePosixPath(case.image.relative_to(manifest.root).as_posix())) for case in cases]
    elif path.is_dir():
        selection = select_flair_inputs(path, pattern=pattern, exclude=exclude)
        found = [ScanInput(file, PurePosixPath(file.relative_to(path).as_posix())) for file in selection.selected]
        left_out = [item for item in selection.skipped if item.reason != "inside the output folder"]
    elif path.is_file():
        if not is_nifti(path):
            raise InputError(path, "not a NIfTI file (.nii or .nii.gz), a folder or a manifest JSON")
        found = [ScanInput(path, PurePosixPath(path.name))]
    else:
        raise InputError(path, "no such file or folder")
    if not found:
        detail = f"; left out: {left_out[0]}" + (f" and {len(left_out) - 1} more" if len(left_out) > 1 else "") if left_out else ""
        raise InputError(path, "no scans found (.nii or .nii.gz)" + display_path(detail))
    return sorted(found, key=lambda scan: str(scan.relative)), left_out


def shard(items: Sequence[Any], num_parts: int = 1, part_id: int = 0) -> List[Any]:
    """Items ``part_id, part_id + num_parts, ...``: the parts partition the list."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ConfigError(f"need num_parts >= 1 and 0 <= part_id < num_parts, got {num_parts}, {part_id}")
    return list(items[part_id::num_parts])


def check_layout(inputs: str | os.PathLike, scans: Sequence[ScanInput], layout: str) -> None:
    """Refuse, before any work, inputs the layout cannot name and inputs sharing one output.

    Raises:
        InputError: a name the ``bids`` layout cannot use, or two inputs with one output file
            (``scan.nii`` and ``scan.nii.gz``; names differing only in case).
    """
    first: Dict[str, PurePath] = {}
    pairs = []
    for scan in scans:
        try:
            target = layout_output_path(scan.relative, layout)
        except ValueError as error:
            raise InputError(scan.path, f"--layout {layout}: {error}") from None
        key = target.as_posix().casefold()
        if key in first:
            pairs.append((first[key], scan.relative, target))
        else:
            first[key] = scan.relative
    if pairs:
        raise InputError(inputs, "inputs that would write the same output (rename one of each pair): " + "; ".join(
            f"{display_path(a)} and {display_path(b)} -> {display_path(target)}" for a, b, target in pairs))

