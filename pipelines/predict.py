"""Predict lesion masks for a folder, a file or a manifest fold with a trained planar res-u-net.

Each scan goes through the steps training used, recorded in the ``planar3d-model/1`` checkpoint:

1. **load**: :func:`planar3d.io.read_volume` (missing, truncated, 4D, NaN files are refused);
2. **preprocess**: exact RAS reorientation (:class:`planar3d.preprocess.Reorientation`) and
   intensity normalisation with the checkpoint's parameters (both through
   :func:`planar3d.preprocess.load_preprocessed`, as in training);
3. **model**: :func:`planar3d.inference.predict_probabilities`: one pass over the whole scan
   when its memory fits, else slabs along the network's plane axis with discarded margins (a
   checkpoint's window of whole planes means this too); a checkpoint's 3D window, or
   ``roi_size``/``overlap``, gives blended sliding windows instead; optional flip TTA over the
   two in-plane axes;
4. **postprocess** (:func:`lesion_mask`): threshold (the checkpoint's, or ``threshold``), then removal of 6-connected
   components of volume ≤ ``min_lesion_size`` mm³ (the MSSEG rule of
   :func:`planar3d.metrics.lesion.label_lesions`, so evaluation counts exactly the lesions kept);
5. **write**: back to the scan's own voxel order and written with :func:`planar3d.io.write_like`:
   the mask has the input's shape, affine, qform/sform and codes, voxel for voxel (uint8, 0/1).

Outputs mirror the inputs' relative paths in a ``layout`` (:func:`planar3d.naming.layout_output_path`:
``suffix`` ``OUT/sub-01/flair_mask.nii.gz``, ``nnunet`` ``case.nii.gz``, ``bids`` derivatives),
``_prob.nii.gz`` (float32) with ``save_probabilities``, ``_qc.png`` with ``qc``, and a provenance
sidecar ``_mask.json`` (:mod:`pipelines.prediction_record`). Every file is written atomically and
the sidecar last: an existing output is reused only when its sidecar shows the same model(s) and
settings, else recomputed (always with ``overwrite``). After the batch the lesion report CSVs
(:mod:`planar3d.lesion_report`) and, with ``qc``, ``qc/index.html`` (:mod:`planar3d.qc_page`) are
written. Several models make an :class:`Ensemble`. ``num_parts``/``part_id`` shard the sorted
scan list (scan ``i`` goes to part ``i % num_parts``) for several processes or machines.

Reading the next scans and writing finished ones run in worker threads while the model runs on
the current one (:mod:`planar3d.pipelining`: a bounded number of scans ahead and behind, so
memory stays bounded); on CUDA one small warm-up pass runs while the first scans are read. A scan
that fails is recorded with its path and reason and the others go on. Each scan is claimed before
it is read (:mod:`planar3d.claims`), so concurrent workers on one output folder never do a scan
twice; each worker writes its part summary and ``predictions.json`` is merged from all parts
(:mod:`planar3d.summaries`): every scan's input, output, status, seconds, per-step timings and error.

Example:
    >>> summary = predict_folder("scans/", "preds/", "runs/fold0")   # doctest: +SKIP
    >>> print(summary.text())                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from planar3d.checkpoint import ModelCheckpoint
from planar3d.claims import ScanClaims
from planar3d.errors import ConfigError, InputError, Planar3DError, SummaryWriteError, WeightsError
from planar3d.io import (
    MAX_IMAGE_BYTES, check_output_folder, display_path, json_safe, make_folder, remove_stale_temporaries, sha256_file,
    voxel_spacing, write_json, write_like,
)
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3, label_lesions
from planar3d.naming import (
    BIDS_DERIVATIVE_ROOT, LAYOUTS, MASK_SUFFIX, PROBABILITY_SUFFIX, is_nifti, layout_output_path, output_path,
    strip_nifti_extension, write_dataset_description,
)
from planar3d.inputs import Skipped, select_flair_inputs
from pipelines.prediction_record import (
    MASK_INTENT_NAME, header_description, prediction_record, read_sidecar, reuse_problem, sidecar_path,
)
from planar3d.pipelining import ReadAhead, WriteBehind
from planar3d.preprocess import NormalizationConfig, Reorientation, load_preprocessed
from planar3d.summaries import claims_folder, merge_part_summaries, part_file

#: Window meaning "the whole volume in one pass, or slabs along the plane axis when memory requires".
WHOLE_VOLUME = (-1, -1, -1)
#: Window overlap used when the checkpoint gives none.
DEFAULT_OVERLAP = 0.25
QC_SUFFIX = "_qc"
STEPS = ("load", "preprocess", "model", "postprocess", "write")
#: Per-scan errors a batch records and goes past: any exception. A bug met on one scan (a
#: TypeError on an exotic file) must not cost the other scans of the batch nor its summary; it is
#: recorded with its type name. KeyboardInterrupt and SystemExit still stop the batch.
SCAN_ERRORS = (Exception,)


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceSettings:
    """Everything :func:`predict_scan` needs besides the model, from a checkpoint and overrides.

    Attributes:
        normalization: intensity scaling parameters (as in training).
        plane_axis: the network's plane axis (in RAS array order).
        in_channels: input channels of the network (3: the grey volume repeated).
        threshold: probability threshold.
        roi_size: window per axis (-1 = whole axis).
        overlap: window overlap fraction.
        flip_axes: axes flipped for TTA (empty: no TTA).
        min_lesion_size: components of at most this volume (mm³) are removed.
        sw_batch_size: windows per forward pass.
        device: torch device string.
        max_image_bytes: largest image accepted (see :func:`planar3d.io.load_image`).
    """

    normalization: NormalizationConfig = NormalizationConfig()
    plane_axis: int = 2
    in_channels: int = 1
    threshold: float = 0.5
    roi_size: Tuple[int, int, int] = WHOLE_VOLUME
    overlap: float = DEFAULT_OVERLAP
    flip_axes: Tuple[int, ...] = ()
    min_lesion_size: float = MIN_LESION_SIZE_MM3
    sw_batch_size: int = 1
    device: str = "cpu"
    max_image_bytes: int = MAX_IMAGE_BYTES

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: ModelCheckpoint,
        threshold: Optional[float] = None,
        roi_size: Optional[Sequence[int]] = None,
        overlap: Optional[float] = None,
        tta: bool = False,
        min_lesion_size: float = MIN_LESION_SIZE_MM3,
        sw_batch_size: int = 1,
        device: str = "cpu",
    ) -> "InferenceSettings":
        """Settings of a :class:`planar3d.checkpoint.ModelCheckpoint`; arguments not None override it.

        A checkpoint without a window size, or with whole-plane slabs, gets :data:`WHOLE_VOLUME`
        (one pass, or slabs along the plane axis when memory requires).

        Raises:
            ConfigError: a value out of range (threshold outside (0, 1), roi_size not 3 values...).
        """
        plane_axis = int(checkpoint.network.plane_axis)
        if roi_size is None:
            stored = checkpoint.roi_size
            # Slabs of whole planes (training validation's setting) become the whole-volume pass,
            # cut into slabs only when memory requires (planar3d.inference): the least work.
            whole_planes = stored is None or all(int(r) < 0 for axis, r in enumerate(stored) if axis != plane_axis)
            roi_size = WHOLE_VOLUME if whole_planes else stored
        roi_size = tuple(int(r) for r in roi_size)
        if len(roi_size) != 3 or any(r == 0 or r < -1 for r in roi_size):
            raise ConfigError(f"roi_size must be 3 positive sizes or -1 (whole axis), got {roi_size}")
        overlap = checkpoint.overlap if overlap is None else overlap
        if not 0.0 <= float(overlap) < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        threshold = checkpoint.threshold if threshold is None else threshold
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        if min_lesion_size < 0:
            raise ConfigError(f"min_lesion_size must be >= 0 mm³, got {min_lesion_size}")
        return cls(
            normalization=checkpoint.normalization,
            plane_axis=plane_axis,
            in_channels=int(checkpoint.network.in_channels),
            threshold=float(threshold),
            roi_size=roi_size,  # type: ignore[arg-type]
            overlap=float(overlap),
            flip_axes=tuple(axis for axis in range(3) if axis != plane_axis) if tta else (),
            min_lesion_size=float(min_lesion_size),
            sw_batch_size=int(sw_batch_size),
            device=str(device),
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


# --- one scan, step by step -------------------------------------------------------------------


def lesion_mask(probability: np.ndarray, threshold: float, spacing: Sequence[float],
                min_lesion_size: float = MIN_LESION_SIZE_MM3) -> Tuple[np.ndarray, int]:
    """Step 4, the one post-processing rule: voxels above ``threshold``, without the 6-connected
    components of volume ≤ ``min_lesion_size`` mm³ (0: keep all); returns ``(mask, lesions kept)``.

    The components are those of :func:`planar3d.metrics.lesion.label_lesions` (the MSSEG rule),
    so evaluation counts exactly the lesions kept. Only voxel volume matters, so ``spacing`` may
    be in any axis order.
    """
    labels, lesions = label_lesions(np.asarray(probability) > threshold, spacing, max(float(min_lesion_size), 0.0))
    return labels > 0, lesions


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_size: float) -> np.ndarray:
    """Drop the 6-connected components of ``mask`` of volume ≤ ``min_size`` mm³ (:func:`lesion_mask`).

    Example:
        >>> m = np.zeros((5, 5, 5), bool); m[0, 0, :3] = True; m[3, 3, 3] = True
        >>> int(remove_small_components(m, (1, 1, 1), 2.0).sum())
        3
    """
    return lesion_mask(np.asarray(mask).astype(bool, copy=False), 0.5, spacing, min_size)[0]


@dataclass
class PreparedScan:
    """A scan read and preprocessed (RAS order), waiting for the model."""

    scan: ScanInput
    image: Any  # nibabel.Nifti1Image, the geometry to write on
    reorientation: Reorientation
    volume: np.ndarray  # normalised, RAS order
    raw_ras: Optional[np.ndarray]  # raw intensities in RAS order (for QC), else None
    timings: Dict[str, float] = field(default_factory=dict)
    report: Optional[Tuple[Any, List[Any]]] = None  # (ScanRow, [LesionRow]) of planar3d.lesion_report
    warnings: List[str] = field(default_factory=list)  # planar3d.qc_page.scan_warnings


def prepare_scan(scan: ScanInput, settings: InferenceSettings, keep_raw: bool = False) -> PreparedScan:
    """Steps 1-2 (:func:`planar3d.preprocess.load_preprocessed`): read with input checks,
    reorient to RAS, normalise.

    Raises:
        InputError: the file cannot be used (unreadable, truncated, not 3D, NaN, constant).
    """
    loaded = load_preprocessed(scan.path, settings.normalization, keep_raw=keep_raw,
                              max_image_bytes=settings.max_image_bytes)
    return PreparedScan(scan, loaded.image, loaded.reorientation, loaded.volume, loaded.raw, dict(loaded.seconds))


@dataclass
class Ensemble:
    """Several trained models whose probabilities are averaged (:mod:`planar3d.ensemble`).

    Each member runs with its own settings (normalisation, window, plane axis) on the same RAS
    volume; the batch's settings (threshold, minimum lesion size) apply to the average.
    """

    models: List[Any]
    settings: List[InferenceSettings]

    def needs_raw(self, settings: InferenceSettings) -> bool:
        """A member normalises differently from ``settings``: the raw intensities must be kept."""
        return any(member.normalization != settings.normalization for member in self.settings)

    def probabilities(self, prepared: PreparedScan, settings: InferenceSettings, progress: bool = False) -> np.ndarray:
        from planar3d.ensemble import average_probabilities
        from planar3d.preprocess import normalize_intensity

        maps = []
        for model, member in zip(self.models, self.settings):
            volume = prepared.volume if member.normalization == settings.normalization \
                else normalize_intensity(prepared.raw_ras, member.normalization)
            maps.append(_probabilities(model, volume, member, progress))
        return average_probabilities(maps)


def _probabilities(model: Any, volume: np.ndarray, settings: InferenceSettings, progress: bool = False) -> np.ndarray:
    from planar3d.inference import predict_probabilities

    return predict_probabilities(
        model, volume, roi_size=settings.roi_size, overlap=settings.overlap,
        sw_batch_size=settings.sw_batch_size, device=settings.device, flip_axes=settings.flip_axes,
        in_channels=settings.in_channels, progress=progress,
    )


def run_model(model: Any, prepared: PreparedScan, settings: InferenceSettings, progress: bool = False) -> np.ndarray:
    """Step 3: lesion probabilities in RAS order (the prepared volume is released); ``model``
    may be an :class:`Ensemble`."""
    start = time.perf_counter()
    if isinstance(model, Ensemble):
        probability = model.probabilities(prepared, settings, progress)
    else:
        probability = _probabilities(model, prepared.volume, settings, progress)
    prepared.volume = None  # type: ignore[assignment]
    prepared.timings["model"] = time.perf_counter() - start
    return probability


@dataclass
class OutputPaths:
    """Files written for one scan (``probability``/``qc`` None when not asked for)."""

    mask: Path
    probability: Optional[Path] = None
    qc: Optional[Path] = None

    @classmethod
    def of(cls, out_dir: Path, relative: PurePath, probability: bool = False, qc: bool = False,
           layout: str = "suffix") -> "OutputPaths":
        """Outputs of an input (path relative to the input root) in a layout of :data:`planar3d.naming.LAYOUTS`.

        Raises:
            ValueError: unknown layout, or ``bids`` with a name that is not BIDS.
        """
        mask = layout_output_path(relative, layout, MASK_SUFFIX)
        if layout == "suffix":
            stem = strip_nifti_extension(relative)
            qc_path = stem.with_name(stem.name + QC_SUFFIX + ".png")
        else:
            stem = strip_nifti_extension(mask)
            qc_path = stem.with_name(stem.name + QC_SUFFIX + ".png")
        return cls(
            out_dir / mask,
            out_dir / layout_output_path(relative, layout, PROBABILITY_SUFFIX) if probability else None,
            out_dir / qc_path if qc else None,
        )

    @property
    def record(self) -> Path:
        """The provenance sidecar beside the mask (:func:`pipelines.prediction_record.sidecar_path`)."""
        return sidecar_path(self.mask)

    def all(self) -> List[Path]:
        return [p for p in (self.mask, self.probability, self.qc, self.record) if p is not None]

    def exist(self) -> bool:
        return all(p.is_file() for p in self.all())


def finish_scan(
    prepared: PreparedScan, probability: np.ndarray, outputs: OutputPaths, settings: InferenceSettings,
    record: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Steps 4-5: threshold, remove small components, write in the scan's own grid.

    The mask's header carries the provenance (``descrip``, ``intent_name``; geometry untouched)
    and the sidecar JSON the full ``record`` (:mod:`pipelines.prediction_record`), written last so
    that a sidecar always means complete outputs. ``prepared.report`` and ``prepared.warnings``
    get the scan's lesion report and QC warnings.

    Returns:
        ``{"lesions": number kept, "lesion_volume_mm3": total}``.
    """
    from planar3d.lesion_report import scan_lesion_report
    from planar3d.qc_page import scan_warnings

    start = time.perf_counter()
    record = record if record is not None else prediction_record([], asdict(settings))
    spacing = voxel_spacing(prepared.image)
    mask_ras, lesions = lesion_mask(probability, settings.threshold, spacing, settings.min_lesion_size)
    mask = prepared.reorientation.inverse(mask_ras)
    probability_scan = prepared.reorientation.inverse(probability)
    # the mask holds only kept lesions, so no size rule again: the report counts exactly them
    prepared.report = scan_lesion_report(mask, prepared.image.affine, prepared.scan.relative.as_posix(),
                                         probability=probability_scan, min_lesion_size=0.0)
    if prepared.raw_ras is not None:
        prepared.warnings = scan_warnings(prepared.raw_ras, mask_ras)
    postprocessed = time.perf_counter()
    outputs.mask.parent.mkdir(parents=True, exist_ok=True)
    write_like(mask.astype(np.uint8), prepared.image, outputs.mask, np.uint8,
               description=header_description(record), intent_name=MASK_INTENT_NAME)
    if outputs.probability is not None:
        write_like(probability_scan.astype(np.float32), prepared.image, outputs.probability, np.float32,
                   description=header_description(record), intent_name="planar3d-prob")
    if outputs.qc is not None:
        from planar3d.qc import save_ras_overlay_png

        raw = prepared.raw_ras if prepared.raw_ras is not None else prepared.reorientation.forward(np.asarray(prepared.image.dataobj))
        save_ras_overlay_png(raw, {"prediction": mask_ras}, prepared.reorientation.affine, outputs.qc, plane_axis=settings.plane_axis)
    stats = {"lesions": lesions, "lesion_volume_mm3": float(mask.sum()) * float(np.prod(spacing))}
    write_json(outputs.record, {
        **record, "input": str(prepared.scan.path),
        # relative to the mask's folder, so the output folder can move
        "outputs": {"probability": None if outputs.probability is None else os.path.relpath(outputs.probability, outputs.mask.parent),
                    "qc": None if outputs.qc is None else os.path.relpath(outputs.qc, outputs.mask.parent)},
        "scan": {"name": prepared.scan.relative.as_posix(), **stats, "warnings": prepared.warnings},
    })
    prepared.timings["postprocess"] = postprocessed - start
    prepared.timings["write"] = time.perf_counter() - postprocessed
    return stats


@dataclass
class ScanResult:
    """What happened to one scan. ``status``: ``"done"``, ``"skipped"`` (output existed),
    ``"failed"``, or ``"claimed"`` (another live worker on the same output folder has it)."""

    input: str
    output: str
    status: str
    seconds: float = 0.0
    error: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    lesions: Optional[int] = None
    lesion_volume_mm3: Optional[float] = None
    redone: Optional[str] = None  # why existing outputs were recomputed (other model or settings)


def predict_scan(
    model: Any,
    checkpoint: ModelCheckpoint,
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: Optional[InferenceSettings] = None,
    probability_path: Optional[str | os.PathLike] = None,
    qc_path: Optional[str | os.PathLike] = None,
) -> ScanResult:
    """Predict one scan with a model object (any module returning logits), all steps in order.

    Args:
        model: the network (or any ``nn.Module`` mapping (N, C, X, Y, Z) to logits (N, 1, X, Y, Z)).
        checkpoint: the :class:`planar3d.checkpoint.ModelCheckpoint` (its ``state_dict`` is not
            used: ``model`` runs).
        path: the input NIfTI file.
        out_path: the mask to write.
        settings: default ``InferenceSettings.from_checkpoint(checkpoint)``.
        probability_path, qc_path: also write the probability map / a QC picture there.

    Returns:
        A ``"done"`` :class:`ScanResult` with per-step ``timings`` (seconds).

    Raises:
        InputError: the scan cannot be used (the batch in :func:`predict_folder` records it).
    """
    settings = settings or InferenceSettings.from_checkpoint(checkpoint)
    outputs = OutputPaths(Path(out_path), None if probability_path is None else Path(probability_path),
                          None if qc_path is None else Path(qc_path))
    start = time.perf_counter()
    prepared = prepare_scan(ScanInput(Path(path), PurePosixPath(Path(path).name)), settings, keep_raw=qc_path is not None)
    probability = run_model(model, prepared, settings)
    stats = finish_scan(prepared, probability, outputs, settings)
    return ScanResult(str(path), str(out_path), "done", time.perf_counter() - start, None, dict(prepared.timings), **stats)


# --- a batch ----------------------------------------------------------------------------------


@dataclass
class PredictionSummary:
    """Results of a batch, in input order, and where they were recorded."""

    results: List[ScanResult]
    out_dir: Path
    summary_path: Path
    wall_seconds: float
    settings: Dict[str, Any] = field(default_factory=dict)
    part_path: Optional[Path] = None  # this worker's own part summary (see planar3d.summaries)
    provenance: Optional[Dict[str, Any]] = None  # pipelines.prediction_record.prediction_record
    left_out: List[Skipped] = field(default_factory=list)  # NIfTI files of the input folder not taken
    reports: Dict[str, Path] = field(default_factory=dict)  # lesion report CSVs and QC page written

    def _with(self, status: str) -> List[ScanResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> List[ScanResult]:
        return self._with("done")

    @property
    def skipped(self) -> List[ScanResult]:
        return self._with("skipped")

    @property
    def failed(self) -> List[ScanResult]:
        return self._with("failed")

    @property
    def claimed(self) -> List[ScanResult]:
        return self._with("claimed")

    def step_totals(self) -> Dict[str, float]:
        """Seconds spent in each step, summed over the scans done."""
        return {step: sum(r.timings.get(step, 0.0) for r in self.done) for step in STEPS}

    def text(self) -> str:
        """A few lines: counts, time per scan, failures with their reasons."""
        done = self.done
        lines = [
            f"{len(done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
            + (f", {len(self.claimed)} left to other workers" if self.claimed else "")
            + f" of {len(self.results)} scans in {self.wall_seconds:.1f} s"
            + (f" ({self.wall_seconds / len(done):.1f} s per scan done)" if done else "")
        ]
        if done:
            totals = self.step_totals()
            lines.append("time per scan: " + ", ".join(f"{step} {totals[step] / len(done):.2f} s" for step in STEPS))
        lines += [f"FAILED {display_path(r.input)}: {display_path(r.error)}" for r in self.failed]
        redone = [r for r in self.done if r.redone]
        if redone:
            lines.append(f"{len(redone)} existing outputs recomputed (other model or settings), e.g. "
                         f"{display_path(redone[0].output)}: {display_path(redone[0].redone)}")
        if self.left_out:
            shown = "; ".join(display_path(item) for item in self.left_out[:3])
            lines.append(f"left out {len(self.left_out)} NIfTI files that are not FLAIR scans to segment: {shown}"
                         + (" ..." if len(self.left_out) > 3 else "") + " (choose with --pattern)")
        lines += [f"wrote {display_path(path)}" for path in self.reports.values()]
        lines.append(f"wrote {self.summary_path}")
        return "\n".join(lines)

    def to_json_dict(self) -> Dict[str, Any]:
        return {
            "format": "planar3d-predictions/1",
            "out_dir": str(self.out_dir),
            "wall_seconds": self.wall_seconds,
            "finished": time.time(),
            "counts": {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                       **({"claimed": len(self.claimed)} if self.claimed else {})},
            "settings": self.settings,
            "provenance": self.provenance,
            "left_out": [{"path": str(item.path), "reason": item.reason} for item in self.left_out],
            "scans": [json_safe(asdict(r)) for r in self.results],
        }


def reusable(outputs: OutputPaths, record: Dict[str, Any], overwrite: bool = False) -> Tuple[bool, Optional[str]]:
    """``(reuse the outputs, why they are recomputed)``: reused only when every output exists and
    the sidecar's record matches ``record`` (same model SHA-256s and settings); the reason is set
    when a mask exists but was made otherwise."""
    if overwrite or not outputs.mask.is_file():
        return False, None
    problem = reuse_problem(read_sidecar(outputs.mask), record)
    if problem is not None:
        return False, problem
    return outputs.exist(), None


def write_batch_reports(summary: "PredictionSummary", reports: Dict[int, Tuple[Any, List[str]]], qc: bool) -> Dict[str, Path]:
    """The lesion report CSVs of every scan done or reused (:mod:`planar3d.lesion_report`) and, with
    ``qc``, ``qc/index.html`` (:mod:`planar3d.qc_page`); reused scans are read back from their
    mask, probability map and sidecar. Returns the files written."""
    from planar3d.lesion_report import report_from_files, write_report_csvs
    from planar3d.qc_page import QCRow, write_qc_page

    scans, lesions, rows = [], [], []
    for index, result in enumerate(summary.results):
        if result.status not in ("done", "skipped"):
            continue
        mask = Path(result.output)
        sidecar = read_sidecar(mask) or {}
        if index in reports:
            (scan_row, lesion_rows), warnings = reports[index]
        else:
            probability = (sidecar.get("outputs") or {}).get("probability")
            probability = mask.parent / probability if probability else None
            try:
                scan_row, lesion_rows = report_from_files(
                    mask, probability if probability is not None and probability.is_file() else None,
                    scan=(sidecar.get("scan") or {}).get("name") or Path(result.input).name, min_lesion_size=0.0)
            except InputError:
                continue
            warnings = list((sidecar.get("scan") or {}).get("warnings") or [])
        scans.append(scan_row)
        lesions += lesion_rows
        if qc:
            png = (sidecar.get("outputs") or {}).get("qc")
            png = (mask.parent / png).absolute() if png else None
            rows.append(QCRow(scan_row.scan, png if png is not None and png.is_file() else None, scan_row.lesion_count,
                              scan_row.lesion_volume_ml, result.seconds if result.status == "done" else float("nan"), warnings))
    written = dict(write_report_csvs(summary.out_dir, scans, lesions))
    if qc:
        written["qc"] = write_qc_page(summary.out_dir, rows, title=f"planar3d QC: {summary.out_dir.name}")
    return written


def summary_file(out_dir: Path, num_parts: int = 1, part_id: int = 0) -> Path:
    """``predictions.json``: the folder summary, merged from every worker's part (any shard)."""
    return out_dir / "predictions.json"


def _error(error: BaseException) -> str:
    text = str(error)
    return text if isinstance(error, Planar3DError) else f"{type(error).__name__}: {text}"


def predict_with_model(
    model: Any,
    checkpoint: ModelCheckpoint,
    scans: Sequence[ScanInput],
    out_dir: str | os.PathLike,
    settings: InferenceSettings,
    save_probabilities: bool = False,
    overwrite: bool = False,
    qc: bool = False,
    summary_path: Optional[Path] = None,
    progress: bool = True,
    num_parts: int = 1,
    part_id: int = 0,
    all_scans: Optional[Sequence[ScanInput]] = None,
    record: Optional[Dict[str, Any]] = None,
    layout: str = "suffix",
    left_out: Sequence[Skipped] = (),
) -> PredictionSummary:
    """Predict ``scans`` with a ready model, reading ahead and writing behind in threads.

    See :func:`predict_folder` for the arguments; ``scans`` are already found and sharded, and
    ``all_scans`` (default ``scans``) are those of every part, listed in the merged summary.
    Each scan is claimed (:class:`planar3d.claims.ScanClaims`) before it is read, so workers
    sharing ``out_dir`` never do one twice; this worker's part summary is written, then
    ``predictions.json`` merged from every part (:mod:`planar3d.summaries`). ``record`` is the
    provenance (:func:`pipelines.prediction_record.prediction_record`; default: from ``settings``,
    no model file); an existing output is reused only when its record matches it.

    Raises:
        SummaryWriteError: the summaries could not be written (it carries the results).
    """
    from tqdm import tqdm

    from planar3d.inference import warm_up

    out_dir = make_folder(out_dir)
    summary_path = summary_path or summary_file(out_dir)
    remove_stale_temporaries(out_dir)  # left by a worker killed between write and rename
    claims = ScanClaims(claims_folder(out_dir))
    start = time.perf_counter()
    record = record if record is not None else prediction_record([], asdict(settings), layout)
    if layout == "bids":
        write_dataset_description(out_dir / BIDS_DERIVATIVE_ROOT)
    keep_raw = qc or (isinstance(model, Ensemble) and model.needs_raw(settings))
    results: Dict[int, ScanResult] = {}
    redo: Dict[int, str] = {}
    todo: List[Tuple[int, ScanInput, OutputPaths]] = []
    for index, scan in enumerate(scans):
        outputs = OutputPaths.of(out_dir, scan.relative, save_probabilities, qc, layout)
        reuse, why = reusable(outputs, record, overwrite)
        if reuse:
            results[index] = ScanResult(str(scan.path), str(outputs.mask), "skipped")
        else:
            todo.append((index, scan, outputs))
            if why:
                redo[index] = why

    def key(outputs: OutputPaths) -> str:
        return outputs.mask.relative_to(out_dir).as_posix()

    def failed(index: int, scan: ScanInput, outputs: OutputPaths, error: BaseException, timings=None) -> None:
        results[index] = ScanResult(str(scan.path), str(outputs.mask), "failed", sum((timings or {}).values()), _error(error), dict(timings or {}))
        claims.release(key(outputs))  # a rerun retries it
        bar.write(f"FAILED {display_path(scan.path)}: {display_path(results[index].error)}")

    reports: Dict[int, Tuple[Any, List[str]]] = {}
    bar = tqdm(total=len(todo), desc="predict", unit="scan", disable=not progress or not todo, dynamic_ncols=True)
    if redo:  # one line, however many: the summary and predictions.json have every reason
        index, why = next(iter(redo.items()))
        bar.write(f"recomputing {len(redo)} existing outputs made otherwise, e.g. {display_path(scans[index].relative)}: {why}")

    def claimed_todo():
        """The scans of ``todo`` this worker gets, claimed as the read-ahead reaches them (a few
        scans ahead of the model), so concurrent workers never read the same scan."""
        for index, scan, outputs in todo:
            if not claims.acquire(key(outputs)):
                results[index] = ScanResult(str(scan.path), str(outputs.mask), "claimed", error=f"claimed by {claims.holder(key(outputs))}")
                bar.update(1)
            elif reusable(outputs, record, overwrite)[0]:  # finished by another worker since we looked
                claims.release(key(outputs))
                results[index] = ScanResult(str(scan.path), str(outputs.mask), "skipped")
                bar.update(1)
            else:
                yield index, scan, outputs

    def collect(index: int, scan: ScanInput, outputs: OutputPaths, prepared: PreparedScan, future) -> None:
        try:
            stats = future.result()
        except SCAN_ERRORS as error:
            failed(index, scan, outputs, error, prepared.timings)
        else:
            results[index] = ScanResult(str(scan.path), str(outputs.mask), "done", sum(prepared.timings.values()), None,
                                        dict(prepared.timings), **stats, redone=redo.get(index))
            reports[index] = (prepared.report, prepared.warnings)
            claims.release(key(outputs))
        bar.set_postfix_str(f"{display_path(scan.relative)}: {results[index].seconds:.1f} s")
        bar.update(1)

    try:
        with ReadAhead(lambda item: prepare_scan(item[1], settings, keep_raw), claimed_todo()) as reads, \
                WriteBehind(collect) as writes:
            reads.start()  # claim and decode the first scans while the model warms up
            if todo:
                for member in (model.models if isinstance(model, Ensemble) else [model]):
                    warm_up(member, settings.device, settings.in_channels)
            for (index, scan, outputs), current in reads:
                try:
                    prepared = current.result()
                except SCAN_ERRORS as error:
                    failed(index, scan, outputs, error)
                    bar.update(1)
                    continue
                try:
                    probability = run_model(model, prepared, settings, progress)  # per-window bar on long scans
                except SCAN_ERRORS as error:
                    failed(index, scan, outputs, error, prepared.timings)
                    bar.update(1)
                    continue
                writes.submit((index, scan, outputs, prepared), finish_scan, prepared, probability, outputs, settings, record)
                del probability, prepared
    finally:
        for _, _, outputs in todo:  # only ours are removed; a crash leaves none held
            claims.release(key(outputs))
    bar.close()
    summary = PredictionSummary(
        [results[i] for i in range(len(scans))], out_dir, summary_path, time.perf_counter() - start,
        settings={**asdict(settings), "normalization": settings.normalization.to_dict()},
        part_path=part_file(out_dir, num_parts, part_id), provenance=record, left_out=list(left_out),
    )
    expected = [
        {"input": str(scan.path), "output": str(OutputPaths.of(out_dir, scan.relative, layout=layout).mask)}
        for scan in (all_scans or scans)
    ]
    try:
        assert summary.part_path is not None
        summary.part_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(summary.part_path, summary.to_json_dict())
        merge_part_summaries(out_dir, expected, extra={"settings": summary.settings, "provenance": record,
                                                       "left_out": summary.to_json_dict()["left_out"]})
        if num_parts == 1:  # a sharded run gets its reports from a later unsharded run (it reuses every output)
            summary.reports = write_batch_reports(summary, reports, qc)
    except (OSError, ValueError) as error:
        reason = f"{error.strerror} [errno {error.errno}]" if isinstance(error, OSError) and error.strerror else str(error)
        raise SummaryWriteError(summary.part_path or summary_path, f"cannot write the batch summary: {reason}", summary) from None
    return summary


def predict_folder(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike | Sequence[str | os.PathLike],
    fold: Optional[int] = None,
    root: Optional[str | os.PathLike] = None,
    device: str = "auto",
    threshold: Optional[float] = None,
    min_lesion_size: float = MIN_LESION_SIZE_MM3,
    tta: bool = False,
    save_probabilities: bool = False,
    overlap: Optional[float] = None,
    roi_size: Optional[Sequence[int]] = None,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    qc: bool = False,
    sw_batch_size: int = 1,
    progress: bool = True,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    layout: str = "suffix",
    pattern: Optional[str] = None,
    compile_model: bool = False,
) -> PredictionSummary:
    """Predict lesion masks for every scan of ``inputs`` (see the module docstring).

    Args:
        inputs: a folder (searched recursively, FLAIR scans only: :func:`find_scans`), one NIfTI
            file, or a manifest JSON.
        out_dir: output folder; outputs mirror the inputs' relative paths (``layout``).
        model_path: a ``planar3d-model/1`` checkpoint or a run folder (``best.pt``, else
            ``last.pt``); several: an ensemble averaging their probabilities.
        fold, root: with a manifest: that fold's test cases only; data folder overriding its root.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (bf16 autocast and
            channels_last_3d there).
        threshold: probability threshold (default: the checkpoint's; an ensemble: the mean of its
            members', :func:`planar3d.ensemble.ensemble_threshold`).
        min_lesion_size: components of at most this many mm³ are removed (0: keep all).
        tta: average with flips of the two in-plane axes.
        save_probabilities: also write ``_prob.nii.gz`` (float32).
        overlap, roi_size: override the checkpoint's sliding-window settings (-1: whole axis).
        overwrite: redo every scan; without it an output is reused only when its provenance
            record shows the same model(s) and settings, else recomputed.
        num_parts, part_id: predict only scans ``part_id, part_id + num_parts, ...``.
        qc: also write ``_qc.png`` overlays and ``qc/index.html``.
        sw_batch_size: windows per forward pass.
        progress: show a tqdm progress bar on stderr.
        max_image_bytes: scans whose header claims more bytes are refused unread.
        layout: ``suffix`` (``x_mask.nii.gz``), ``nnunet`` (``case.nii.gz``) or ``bids``
            (``derivatives/planar3d/sub-*/[ses-*/]anat/*_desc-lesion_mask.nii.gz``).
        pattern: with a folder, take exactly the files matching this glob.
        compile_model: ``torch.compile`` the network (:func:`planar3d.inference.prepare_for_inference`).

    Returns:
        The :class:`PredictionSummary` of this worker (its part summary is in ``.planar3d/parts``;
        ``predictions.json`` in ``out_dir`` is merged from every worker's part).

    Raises:
        InputError: no inputs, bad manifest or fold, two inputs with one output, an output folder
            that is the input or cannot be written (all checked before the model loads);
            WeightsError: bad checkpoint; ConfigError: bad settings; SummaryWriteError: the
            summary could not be written. A failing *scan* does not raise: it is in ``summary.failed``.
    """
    out_dir = Path(out_dir)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if Path(inputs).is_dir() and Path(out_dir).resolve() == Path(inputs).resolve():
        raise InputError(out_dir, "output folder is the input folder: masks would be mixed with the scans; choose another -o")
    found, left_out = find_scans(inputs, fold, root, exclude=out_dir, pattern=pattern)
    check_layout(inputs, found, layout)
    scans = shard(found, num_parts, part_id)
    check_output_folder(out_dir, inputs)
    device = resolve_device(device)
    model, settings, record = load_models(
        [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path), device,
        threshold=threshold, roi_size=roi_size, overlap=overlap, tta=tta, min_lesion_size=min_lesion_size,
        sw_batch_size=sw_batch_size, layout=layout, compile_model=compile_model)
    settings = replace(settings, max_image_bytes=int(max_image_bytes))
    return predict_with_model(
        model, None, scans, out_dir, settings, save_probabilities=save_probabilities,  # type: ignore[arg-type]
        overwrite=overwrite, qc=qc, summary_path=summary_file(out_dir, num_parts, part_id), progress=progress,
        num_parts=num_parts, part_id=part_id, all_scans=found, record=record, layout=layout, left_out=left_out,
    )


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


def load_models(
    model_paths: Sequence[str | os.PathLike], device: str, threshold: Optional[float] = None, layout: str = "suffix",
    compile_model: bool = False, **overrides: Any,
) -> Tuple[Any, InferenceSettings, Dict[str, Any]]:
    """The model (one, or an :class:`Ensemble` of several), the batch's settings and the provenance record.

    Each checkpoint is identified by its file's SHA-256. ``overrides`` are
    :meth:`InferenceSettings.from_checkpoint` arguments applied to every member. An ensemble's
    threshold is ``threshold`` or the mean of the members' (:func:`planar3d.ensemble.ensemble_threshold`).

    Raises:
        WeightsError: a missing or unreadable checkpoint, not a planar3d model, or members on another voxel convention.
    """
    from planar3d.checkpoint import load_model
    from planar3d.ensemble import check_member_conventions, ensemble_threshold
    from planar3d.inference import prepare_for_inference

    if not model_paths:
        raise ConfigError("no model given (--model RUN_FOLDER or CHECKPOINT)")
    models, member_settings, described = [], [], []
    for model_path in model_paths:
        path = resolve_checkpoint(model_path)
        model, checkpoint = load_model(path, device)
        member = InferenceSettings.from_checkpoint(checkpoint, threshold=threshold, device=device, **overrides)
        models.append(prepare_for_inference(model, device, compile_model=compile_model))
        member_settings.append(member)
        described.append({"path": str(path), "sha256": sha256_file(path), "threshold": float(checkpoint.threshold),
                          "orientation": getattr(checkpoint, "orientation", "RAS")})
    try:
        check_member_conventions(described, [d["path"] for d in described])
    except ValueError as error:
        raise WeightsError(described[0]["path"], str(error)) from None
    settings = member_settings[0]
    if len(models) > 1:
        chosen = threshold if threshold is not None else ensemble_threshold([d["threshold"] for d in described])
        settings = replace(settings, threshold=float(chosen))
        model: Any = Ensemble(models, member_settings)
    else:
        model = models[0]
    record = prediction_record(described, asdict(settings), layout)
    record["settings"]["device"] = device  # kept for the reader, not compared
    return model, settings, record
