"""One scan, step by step: prepare (read, reorient, normalise) -> model -> finish (post-process, write).

- :func:`prepare_scan` (steps 1-2, :class:`PreparedScan`): :func:`planar3d.preprocess.load_preprocessed`;
- :func:`run_model` (step 3): :func:`planar3d.inference.predict_probabilities`, or an
  :class:`Ensemble` averaging several models' probabilities;
- :func:`finish_scan` (steps 4-5): :func:`lesion_mask`, the one post-processing rule (threshold,
  then removal of small 6-connected components, as :func:`planar3d.metrics.lesion.label_lesions`
  counts them), and the writes to :class:`OutputPaths` in the scan's own grid, provenance sidecar last;
- :func:`predict_scan`: all steps in order for one file, giving a :class:`ScanResult`.

The batch that runs these steps in threads over many scans is :mod:`pipelines.predict_batch`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from planar3d.checkpoint import ModelCheckpoint
from planar3d.io import voxel_spacing, write_json, write_like
from planar3d.metrics.lesion import (
    MIN_LESION_SIZE_MM3, drop_components_outside, drop_unconfident_components, label_lesions,
)
from planar3d.naming import MASK_SUFFIX, PROBABILITY_SUFFIX, layout_output_path, strip_nifti_extension
from planar3d.preprocess import Reorientation, load_preprocessed
from pipelines.predict_setup import InferenceSettings, ScanInput
from pipelines.prediction_record import MASK_INTENT_NAME, header_description, prediction_record, sidecar_path

QC_SUFFIX = "_qc"
STEPS = ("load", "preprocess", "brain_mask", "model", "postprocess", "write")


def lesion_mask(probability: np.ndarray, threshold: float, spacing: Sequence[float],
                min_lesion_size: float = MIN_LESION_SIZE_MM3,
                core_threshold: Optional[float] = None, brain: Optional[np.ndarray] = None,
                below_grey_matter_max: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int]:
    """Step 4, the one post-processing rule: voxels above ``threshold``, without the 6-connected
    components of volume ≤ ``min_lesion_size`` mm³ (0: keep all), with ``core_threshold``
    without those whose highest probability is at most it (hysteresis), and with a ``brain``
    mask (same grid) without those of which less than
    :data:`planar3d.brain_mask.MIN_INSIDE_FRACTION` lies in it, and likewise with
    ``below_grey_matter_max`` (:attr:`planar3d.brain_mask.TemplateMasks.below_grey_matter_max`):
    without those lying mostly in grey matter; returns ``(mask, lesions kept)``.

    The components are those of :func:`planar3d.metrics.lesion.label_lesions` (the MSSEG rule),
    so evaluation counts exactly the lesions kept. Only voxel volume matters, so ``spacing`` may
    be in any axis order.
    """
    probability = np.asarray(probability)
    labels, lesions = label_lesions(probability > threshold, spacing, max(float(min_lesion_size), 0.0))
    labels, lesions = drop_unconfident_components(labels, lesions, probability, core_threshold)
    from planar3d.brain_mask import MIN_INSIDE_FRACTION

    for inside in (brain, below_grey_matter_max):
        if inside is not None:
            labels, lesions = drop_components_outside(labels, lesions, inside, MIN_INSIDE_FRACTION)
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
    brain: Optional[np.ndarray] = None  # brain mask in RAS order (settings.brain_mask), else None
    brain_fit: Dict[str, Any] = field(default_factory=dict)  # the registration behind it (planar3d.brain_mask)
    below_grey_matter_max: Optional[np.ndarray] = None  # RAS order, with settings.grey_matter_max, else None
    passes: Dict[str, Any] = field(default_factory=dict)  # how the model ran (planar3d.inference.predict_probabilities)


def prepare_scan(scan: ScanInput, settings: InferenceSettings, keep_raw: bool = False) -> PreparedScan:
    """Steps 1-2 (:func:`planar3d.preprocess.load_preprocessed`): read with input checks,
    reorient to RAS, normalise; with ``settings.brain_mask``, the brain mask, and with
    ``settings.grey_matter_max`` the voxels below it (:func:`planar3d.brain_mask.mni152_masks`,
    one fit on the raw RAS intensities).

    Raises:
        InputError: the file cannot be used (unreadable, truncated, not 3D, NaN, constant), or
            its brain mask could not be made (a failed registration).
    """
    loaded = load_preprocessed(scan.path, settings.normalization, keep_raw=keep_raw or settings.brain_mask is not None,
                              max_image_bytes=settings.max_image_bytes)
    prepared = PreparedScan(scan, loaded.image, loaded.reorientation, loaded.volume, loaded.raw, dict(loaded.seconds))
    if settings.brain_mask is not None:
        import nibabel as nib

        from planar3d.brain_mask import mni152_masks
        from planar3d.errors import InputError

        start = time.perf_counter()
        try:
            masks = mni152_masks(nib.Nifti1Image(loaded.raw, loaded.reorientation.affine), loaded.raw,
                                 fit=prepared.brain_fit, grey_matter_max=settings.grey_matter_max)
        except ValueError as error:
            raise InputError(scan.path, f"brain mask: {error}") from None
        prepared.brain, prepared.below_grey_matter_max = masks.brain, masks.below_grey_matter_max
        prepared.timings["brain_mask"] = time.perf_counter() - start
        if not keep_raw:
            prepared.raw_ras = None
    return prepared


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

        maps, member_passes = [], []
        for model, member in zip(self.models, self.settings):
            volume = prepared.volume if member.normalization == settings.normalization \
                else normalize_intensity(prepared.raw_ras, member.normalization)
            member_passes.append({})
            maps.append(_probabilities(model, volume, member, progress, member_passes[-1]))
        # the record shows a member that had to run in slabs, else the first (they all ran alike)
        prepared.passes = next(({**passes, "member": index} for index, passes in enumerate(member_passes)
                                if passes.get("mode") == "slabs"), member_passes[0])
        return average_probabilities(maps)


def _probabilities(model: Any, volume: np.ndarray, settings: InferenceSettings, progress: bool = False,
                   passes: Optional[Dict[str, Any]] = None) -> np.ndarray:
    from planar3d.inference import predict_probabilities

    return predict_probabilities(
        model, volume, roi_size=settings.roi_size, overlap=settings.overlap,
        sw_batch_size=settings.sw_batch_size, device=settings.device, flip_axes=settings.flip_axes,
        in_channels=settings.in_channels, precision=settings.precision, progress=progress, passes=passes,
    )


def run_model(model: Any, prepared: PreparedScan, settings: InferenceSettings, progress: bool = False) -> np.ndarray:
    """Step 3: lesion probabilities in RAS order (the prepared volume is released); ``model``
    may be an :class:`Ensemble`."""
    start = time.perf_counter()
    if isinstance(model, Ensemble):
        probability = model.probabilities(prepared, settings, progress)
    else:
        probability = _probabilities(model, prepared.volume, settings, progress, prepared.passes)
    if prepared.passes.get("warning"):
        import logging

        prepared.warnings.append(prepared.passes["warning"])
        logging.getLogger("planar3d.predict").warning("warning: %s: %s", prepared.scan.relative.as_posix(), prepared.passes["warning"])
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
    mask_ras, lesions = lesion_mask(probability, settings.threshold, spacing, settings.min_lesion_size,
                                    settings.core_threshold, prepared.brain, prepared.below_grey_matter_max)
    mask = prepared.reorientation.inverse(mask_ras)
    probability_scan = prepared.reorientation.inverse(probability)
    brain = None if prepared.brain is None else prepared.reorientation.inverse(prepared.brain)
    # the mask holds only kept lesions, so no size rule again: the report counts exactly them
    prepared.report = scan_lesion_report(mask, prepared.image.affine, prepared.scan.relative.as_posix(),
                                         probability=probability_scan, brain_mask=brain, min_lesion_size=0.0)
    if prepared.raw_ras is not None:
        prepared.warnings = prepared.warnings + scan_warnings(prepared.raw_ras, mask_ras)
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
    brain_stats = {} if brain is None else {"brain_volume_mm3": float(np.count_nonzero(brain)) * float(np.prod(spacing)),
                                            "brain_mask_fit": prepared.brain_fit}
    write_json(outputs.record, {
        **record, "input": str(prepared.scan.path),
        # relative to the mask's folder, so the output folder can move
        "outputs": {"probability": None if outputs.probability is None else os.path.relpath(outputs.probability, outputs.mask.parent),
                    "qc": None if outputs.qc is None else os.path.relpath(outputs.qc, outputs.mask.parent)},
        "scan": {"name": prepared.scan.relative.as_posix(), **stats, **brain_stats, "model_passes": prepared.passes,
                 "warnings": prepared.warnings},
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
        InputError: the scan cannot be used (the batch in :func:`pipelines.predict.predict_folder` records it).
    """
    settings = settings or InferenceSettings.from_checkpoint(checkpoint)
    outputs = OutputPaths(Path(out_path), None if probability_path is None else Path(probability_path),
                          None if qc_path is None else Path(qc_path))
    start = time.perf_counter()
    prepared = prepare_scan(ScanInput(Path(path), PurePosixPath(Path(path).name)), settings, keep_raw=qc_path is not None)
    probability = run_model(model, prepared, settings)
    stats = finish_scan(prepared, probability, outputs, settings)
    return ScanResult(str(path), str(out_path), "done", time.perf_counter() - start, None, dict(prepared.timings), **stats)

