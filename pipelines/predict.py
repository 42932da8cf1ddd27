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

Outputs mirror the inputs' relative paths (:func:`planar3d.naming.output_path`):
``OUT/sub-01/flair_mask.nii.gz``, ``_prob.nii.gz`` (float32) with ``save_probabilities``,
``_qc.png`` with ``qc``. Every file is written atomically, so an existing output is complete: it
is skipped unless ``overwrite``. ``num_parts``/``part_id`` shard the sorted scan list (scan ``i``
goes to part ``i % num_parts``) for several processes or machines.

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
    MAX_IMAGE_BYTES, check_output_folder, display_path, json_safe, make_folder, remove_stale_temporaries, voxel_spacing,
    write_json, write_like,
)
from planar3d.metrics.lesion import MIN_LESION_SIZE_MM3, label_lesions
from planar3d.naming import (
    MASK_SUFFIX, PROBABILITY_SUFFIX, is_nifti, output_collisions, output_path, strip_nifti_extension,
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
) -> List[ScanInput]:
    """The scans of a folder (recursive, sorted), a single NIfTI file, or a manifest JSON.

    Args:
        inputs: folder, ``.nii``/``.nii.gz`` file, or ``planar3d-manifest/1`` JSON.
        fold: with a manifest, only that fold's test cases (0-based); else all cases.
        root: with a manifest, the data folder overriding its root.
        exclude: a folder whose files are never inputs (the output folder, if inside ``inputs``).

    Raises:
        InputError: missing input, no scans found, ``fold``/``root`` without a manifest.
    """
    path = Path(inputs)
    is_manifest = path.is_file() and path.name.lower().endswith(".json")
    if (fold is not None or root is not None) and not is_manifest:
        raise InputError(path, "a fold or data root need a manifest JSON as input")
    if is_manifest:
        from planar3d.data.manifest import load_manifest

        manifest = load_manifest(path, root=root)
        cases = manifest.cases if fold is None else manifest.test_cases(fold)
        found = [ScanInput(case.image, PurePosixPath(case.image.relative_to(manifest.root).as_posix())) for case in cases]
    elif path.is_dir():
        skip = Path(exclude).resolve() if exclude is not None else None
        found = []
        for file in path.rglob("*"):
            if not is_nifti(file) or file.name.startswith(".") or not file.is_file():
                continue
            if skip is not None and skip in file.resolve().parents:
                continue
            found.append(ScanInput(file, PurePosixPath(file.relative_to(path).as_posix())))
    elif path.is_file():
        if not is_nifti(path):
            raise InputError(path, "not a NIfTI file (.nii or .nii.gz), a folder or a manifest JSON")
        found = [ScanInput(path, PurePosixPath(path.name))]
    else:
        raise InputError(path, "no such file or folder")
    if not found:
        raise InputError(path, "no scans found (.nii or .nii.gz)")
    return sorted(found, key=lambda scan: str(scan.relative))


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


def prepare_scan(scan: ScanInput, settings: InferenceSettings, keep_raw: bool = False) -> PreparedScan:
    """Steps 1-2 (:func:`planar3d.preprocess.load_preprocessed`): read with input checks,
    reorient to RAS, normalise.

    Raises:
        InputError: the file cannot be used (unreadable, truncated, not 3D, NaN, constant).
    """
    loaded = load_preprocessed(scan.path, settings.normalization, keep_raw=keep_raw,
                              max_image_bytes=settings.max_image_bytes)
    return PreparedScan(scan, loaded.image, loaded.reorientation, loaded.volume, loaded.raw, dict(loaded.seconds))


def run_model(model: Any, prepared: PreparedScan, settings: InferenceSettings) -> np.ndarray:
    """Step 3: lesion probabilities in RAS order (the prepared volume is released)."""
    from planar3d.inference import predict_probabilities

    start = time.perf_counter()
    probability = predict_probabilities(
        model, prepared.volume, roi_size=settings.roi_size, overlap=settings.overlap,
        sw_batch_size=settings.sw_batch_size, device=settings.device, flip_axes=settings.flip_axes,
        in_channels=settings.in_channels,
    )
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
    def of(cls, out_dir: Path, relative: PurePath, probability: bool = False, qc: bool = False) -> "OutputPaths":
        stem = strip_nifti_extension(relative)
        return cls(
            out_dir / output_path(relative, MASK_SUFFIX),
            out_dir / output_path(relative, PROBABILITY_SUFFIX) if probability else None,
            out_dir / stem.with_name(stem.name + QC_SUFFIX + ".png") if qc else None,
        )

    def all(self) -> List[Path]:
        return [p for p in (self.mask, self.probability, self.qc) if p is not None]

    def exist(self) -> bool:
        return all(p.is_file() for p in self.all())


def finish_scan(
    prepared: PreparedScan, probability: np.ndarray, outputs: OutputPaths, settings: InferenceSettings
) -> Dict[str, Any]:
    """Steps 4-5: threshold, remove small components, write in the scan's own grid.

    Returns:
        ``{"lesions": number kept, "lesion_volume_mm3": total}``.
    """
    start = time.perf_counter()
    spacing = voxel_spacing(prepared.image)
    mask_ras, lesions = lesion_mask(probability, settings.threshold, spacing, settings.min_lesion_size)
    mask = prepared.reorientation.inverse(mask_ras)
    postprocessed = time.perf_counter()
    outputs.mask.parent.mkdir(parents=True, exist_ok=True)
    write_like(mask.astype(np.uint8), prepared.image, outputs.mask, np.uint8)
    if outputs.probability is not None:
        write_like(prepared.reorientation.inverse(probability).astype(np.float32), prepared.image, outputs.probability, np.float32)
    if outputs.qc is not None:
        from planar3d.qc import save_overlay_png

        raw = prepared.raw_ras if prepared.raw_ras is not None else prepared.reorientation.forward(np.asarray(prepared.image.dataobj))
        save_overlay_png(raw, {"prediction": mask_ras}, prepared.reorientation.spacing, settings.plane_axis, outputs.qc)
    prepared.timings["postprocess"] = postprocessed - start
    prepared.timings["write"] = time.perf_counter() - postprocessed
    return {"lesions": lesions, "lesion_volume_mm3": float(mask.sum()) * float(np.prod(spacing))}


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
            "scans": [json_safe(asdict(r)) for r in self.results],
        }


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
) -> PredictionSummary:
    """Predict ``scans`` with a ready model, reading ahead and writing behind in threads.

    See :func:`predict_folder` for the arguments; ``scans`` are already found and sharded, and
    ``all_scans`` (default ``scans``) are those of every part, listed in the merged summary.
    Each scan is claimed (:class:`planar3d.claims.ScanClaims`) before it is read, so workers
    sharing ``out_dir`` never do one twice; this worker's part summary is written, then
    ``predictions.json`` merged from every part (:mod:`planar3d.summaries`).

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
    results: Dict[int, ScanResult] = {}
    todo: List[Tuple[int, ScanInput, OutputPaths]] = []
    for index, scan in enumerate(scans):
        outputs = OutputPaths.of(out_dir, scan.relative, save_probabilities, qc)
        if outputs.exist() and not overwrite:
            results[index] = ScanResult(str(scan.path), str(outputs.mask), "skipped")
        else:
            todo.append((index, scan, outputs))

    def key(outputs: OutputPaths) -> str:
        return outputs.mask.relative_to(out_dir).as_posix()

    def failed(index: int, scan: ScanInput, outputs: OutputPaths, error: BaseException, timings=None) -> None:
        results[index] = ScanResult(str(scan.path), str(outputs.mask), "failed", sum((timings or {}).values()), _error(error), dict(timings or {}))
        claims.release(key(outputs))  # a rerun retries it
        bar.write(f"FAILED {display_path(scan.path)}: {display_path(results[index].error)}")

    bar = tqdm(total=len(todo), desc="predict", unit="scan", disable=not progress or not todo, dynamic_ncols=True)

    def claimed_todo():
        """The scans of ``todo`` this worker gets, claimed as the read-ahead reaches them (a few
        scans ahead of the model), so concurrent workers never read the same scan."""
        for index, scan, outputs in todo:
            if not claims.acquire(key(outputs)):
                results[index] = ScanResult(str(scan.path), str(outputs.mask), "claimed", error=f"claimed by {claims.holder(key(outputs))}")
                bar.update(1)
            elif outputs.exist() and not overwrite:  # finished by another worker since we looked
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
            results[index] = ScanResult(str(scan.path), str(outputs.mask), "done", sum(prepared.timings.values()), None, dict(prepared.timings), **stats)
            claims.release(key(outputs))
        bar.set_postfix_str(f"{display_path(scan.relative)}: {results[index].seconds:.1f} s")
        bar.update(1)

    try:
        with ReadAhead(lambda item: prepare_scan(item[1], settings, qc), claimed_todo()) as reads, \
                WriteBehind(collect) as writes:
            reads.start()  # claim and decode the first scans while the model warms up
            if todo:
                warm_up(model, settings.device, settings.in_channels)
            for (index, scan, outputs), current in reads:
                try:
                    prepared = current.result()
                except SCAN_ERRORS as error:
                    failed(index, scan, outputs, error)
                    bar.update(1)
                    continue
                try:
                    probability = run_model(model, prepared, settings)
                except SCAN_ERRORS as error:
                    failed(index, scan, outputs, error, prepared.timings)
                    bar.update(1)
                    continue
                writes.submit((index, scan, outputs, prepared), finish_scan, prepared, probability, outputs, settings)
                del probability, prepared
    finally:
        for _, _, outputs in todo:  # only ours are removed; a crash leaves none held
            claims.release(key(outputs))
    bar.close()
    summary = PredictionSummary(
        [results[i] for i in range(len(scans))], out_dir, summary_path, time.perf_counter() - start,
        settings={**asdict(settings), "normalization": settings.normalization.to_dict()},
        part_path=part_file(out_dir, num_parts, part_id),
    )
    expected = [
        {"input": str(scan.path), "output": str(OutputPaths.of(out_dir, scan.relative).mask)} for scan in (all_scans or scans)
    ]
    try:
        assert summary.part_path is not None
        summary.part_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(summary.part_path, summary.to_json_dict())
        merge_part_summaries(out_dir, expected, extra={"settings": summary.settings})
    except (OSError, ValueError) as error:
        reason = f"{error.strerror} [errno {error.errno}]" if isinstance(error, OSError) and error.strerror else str(error)
        raise SummaryWriteError(summary.part_path or summary_path, f"cannot write the batch summary: {reason}", summary) from None
    return summary


def predict_folder(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    fold: Optional[int] = None,
    root: Optional[str | os.PathLike] = None,
    device: str = "cpu",
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
    compile_model: bool = False,
) -> PredictionSummary:
    """Predict lesion masks for every scan of ``inputs`` (see the module docstring).

    Args:
        inputs: a folder (searched recursively), one NIfTI file, or a manifest JSON.
        out_dir: output folder; outputs mirror the inputs' relative paths.
        model_path: a ``planar3d-model/1`` checkpoint, or a run folder (``best.pt``, else ``last.pt``).
        fold, root: with a manifest: that fold's test cases only; data folder overriding its root.
        device: ``"cpu"`` or ``"cuda"`` (bf16 autocast and channels_last_3d there).
        threshold: probability threshold (default: the checkpoint's).
        min_lesion_size: components of at most this many mm³ are removed (0: keep all).
        tta: average with flips of the two in-plane axes.
        save_probabilities: also write ``_prob.nii.gz`` (float32).
        overlap, roi_size: override the checkpoint's sliding-window settings (-1: whole axis).
        overwrite: redo scans whose outputs exist (else they are skipped).
        num_parts, part_id: predict only scans ``part_id, part_id + num_parts, ...``.
        qc: also write ``_qc.png`` overlays (planes normal to the network's plane axis).
        sw_batch_size: windows per forward pass.
        progress: show a tqdm progress bar on stderr.
        max_image_bytes: scans whose header claims more bytes are refused unread.
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
    import torch

    from planar3d.checkpoint import load_model
    from planar3d.inference import prepare_for_inference

    out_dir = Path(out_dir)
    if Path(inputs).is_dir() and Path(out_dir).resolve() == Path(inputs).resolve():
        raise InputError(out_dir, "output folder is the input folder: masks would be mixed with the scans; choose another -o")
    found = find_inputs(inputs, fold, root, exclude=out_dir)
    collisions = output_collisions([scan.relative for scan in found])
    if collisions:
        raise InputError(inputs, "inputs that would write the same output (rename one of each pair): " + "; ".join(
            f"{display_path(a)} and {display_path(b)} -> {display_path(output_path(b))}" for a, b in collisions))
    scans = shard(found, num_parts, part_id)
    check_output_folder(out_dir, inputs)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    model, checkpoint = load_model(resolve_checkpoint(model_path), device)
    settings = InferenceSettings.from_checkpoint(
        checkpoint, threshold=threshold, roi_size=roi_size, overlap=overlap, tta=tta,
        min_lesion_size=min_lesion_size, sw_batch_size=sw_batch_size, device=device,
    )
    settings = replace(settings, max_image_bytes=int(max_image_bytes))
    model = prepare_for_inference(model, device, compile_model=compile_model)
    return predict_with_model(
        model, checkpoint, scans, out_dir, settings, save_probabilities=save_probabilities,
        overwrite=overwrite, qc=qc, summary_path=summary_file(out_dir, num_parts, part_id), progress=progress,
        num_parts=num_parts, part_id=part_id, all_scans=found,
    )
