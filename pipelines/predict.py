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
   components of volume ≤ ``min_lesion_size`` mm³ (the checkpoint's, chosen on validation with
   its threshold, or ``min_lesion_size``; the components are those of
   :func:`planar3d.metrics.lesion.label_lesions`, so evaluation counts exactly the lesions kept),
   and, with a core threshold (the checkpoint's, or ``core_threshold``), of those whose highest
   probability is at most it, with ``brain_mask`` of those mostly outside the brain, and with
   ``grey_matter_max`` of those mostly in grey matter (:mod:`planar3d.brain_mask`, made while the
   scan is prepared);
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

This module is the public entry: :func:`predict_folder` (find the scans, check the output folder,
load the model(s) with :func:`load_models`, run the batch), re-exporting the names callers use
from the modules that own them:

- :mod:`pipelines.predict_setup`: settings (:class:`InferenceSettings`), ``--device`` and
  ``--model`` resolution, finding and sharding the scans, the output layout check;
- :mod:`pipelines.predict_steps`: one scan's steps (:func:`prepare_scan`, :func:`run_model`,
  :func:`finish_scan` with :class:`OutputPaths` and :func:`lesion_mask`), :class:`Ensemble`;
- :mod:`pipelines.predict_batch`: :func:`predict_with_model` (threads, claims, reuse),
  :class:`PredictionSummary`, the batch's reports.

Example:
    >>> summary = predict_folder("scans/", "preds/", "runs/fold0")   # doctest: +SKIP
    >>> print(summary.text())                                        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from planar3d.errors import ConfigError, InputError, WeightsError
from planar3d.host_memory import configure_host_memory
from planar3d.io import MAX_IMAGE_BYTES, check_output_folder, sha256_file
from planar3d.naming import LAYOUTS
from pipelines.predict_batch import (
    SCAN_ERRORS, PredictionSummary, predict_with_model, reusable, summary_file, write_batch_reports,
)
from pipelines.predict_setup import (
    DEFAULT_OVERLAP, WHOLE_VOLUME, InferenceSettings, ScanInput, check_layout, find_inputs, find_scans,
    resolve_checkpoint, resolve_device, shard,
)
from pipelines.predict_steps import (
    QC_SUFFIX, STEPS, Ensemble, OutputPaths, PreparedScan, ScanResult, finish_scan, lesion_mask, predict_scan,
    prepare_scan, remove_small_components, run_model,
)
from pipelines.prediction_record import prediction_record

# The names callers import from here; each is owned by the module it is imported from above.
__all__ = [
    "DEFAULT_OVERLAP", "QC_SUFFIX", "SCAN_ERRORS", "STEPS", "WHOLE_VOLUME",
    "Ensemble", "InferenceSettings", "OutputPaths", "PredictionSummary", "PreparedScan", "ScanInput", "ScanResult",
    "check_layout", "find_inputs", "find_scans", "finish_scan", "lesion_mask", "load_models", "predict_folder",
    "predict_scan", "predict_with_model", "prepare_scan", "remove_small_components", "resolve_checkpoint",
    "resolve_device", "reusable", "run_model", "shard", "summary_file", "write_batch_reports",
]


def predict_folder(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike | Sequence[str | os.PathLike],
    fold: Optional[int] = None,
    root: Optional[str | os.PathLike] = None,
    device: str = "auto",
    threshold: Optional[float] = None,
    min_lesion_size: Optional[float] = None,
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
    precision: str = "auto",
    core_threshold: Optional[float] = None,
    brain_mask: Optional[str] = None,
    grey_matter_max: Optional[float] = None,
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
        min_lesion_size: components of at most this many mm³ are removed (0: keep all; default:
            the checkpoint's, chosen on validation with its threshold; an ensemble: the mean of
            its members', :func:`planar3d.ensemble.ensemble_min_lesion_size`).
        core_threshold: components whose highest probability is at most this are removed
            (hysteresis; 0: none; default: the checkpoint's, chosen on validation with its
            threshold, none for older checkpoints; an ensemble: the mean of its members' when
            every member has one, :func:`planar3d.ensemble.ensemble_core_threshold`).
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
        precision: ``auto`` (bf16 on CUDA, fp32 on the CPU), ``fp32`` or ``bf16``
            (:func:`planar3d.inference.resolve_precision`); recorded and compared on reuse.
        brain_mask: ``"mni152"``: remove predicted lesions mostly outside the registered
            template's brain (:mod:`planar3d.brain_mask`); None: no brain mask.
        grey_matter_max: with ``brain_mask``: also remove those mostly where the template's
            grey-matter probability exceeds it; recorded and compared on reuse.

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
    model_paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    # CPU: how large tensors get their memory (planar3d.host_memory; results unchanged); before the
    # model loads, as PyTorch reads its huge-page switch once
    host_memory = (configure_host_memory(cpu_memory_policy(len(scans), len(model_paths))) if device == "cpu"
                   else "unchanged (not a CPU run)")
    model, settings, record = load_models(
        model_paths, device,
        threshold=threshold, roi_size=roi_size, overlap=overlap, tta=tta, min_lesion_size=min_lesion_size,
        sw_batch_size=sw_batch_size, layout=layout, compile_model=compile_model, precision=precision,
        core_threshold=core_threshold, brain_mask=brain_mask, grey_matter_max=grey_matter_max)
    settings = replace(settings, max_image_bytes=int(max_image_bytes))
    record["settings"]["host_memory"] = host_memory  # kept for the reader, not compared
    return predict_with_model(
        model, None, scans, out_dir, settings, save_probabilities=save_probabilities,  # type: ignore[arg-type]
        overwrite=overwrite, qc=qc, summary_path=summary_file(out_dir, num_parts, part_id), progress=progress,
        num_parts=num_parts, part_id=part_id, all_scans=found, record=record, layout=layout, left_out=left_out,
    )


def cpu_memory_policy(scan_count: int, model_count: int = 1) -> str:
    """The host memory policy (:data:`planar3d.host_memory.POLICIES`) ``predict`` asks for on the CPU.

    ``retain`` when the process runs a network more than once (a folder, an ensemble): each pass
    reuses the memory the one before faulted in. ``huge-pages`` for one scan and one model, where
    there is nothing to reuse and faulting fresh memory 2 MiB at a time is what counts. Measured
    on the 1 mm head with the default config's network (docs/prediction.md, "The memory policy by
    workload"): a first scan took 10.5-16.7 s with huge pages (median 12.3) against 11.9-21.1 s
    retained (median 14.5) at a peak RSS of 6.2-6.5 against 7.5-9.5 GiB; a folder's later scans
    12.1-12.8 s against 9.4-13.3 s.
    """
    return "huge-pages" if scan_count == 1 and model_count == 1 else "retain"


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
    from planar3d.ensemble import check_member_conventions, ensemble_core_threshold, ensemble_min_lesion_size, ensemble_threshold
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
    if settings.precision == "bf16" and str(device).startswith("cpu"):
        from planar3d.inference import cpu_has_bf16_units

        if cpu_has_bf16_units() is False:
            logging.getLogger("planar3d.predict").warning(
                "warning: --precision bf16 on a CPU without bf16 units (no avx512_bf16/amx_bf16 flag): "
                "expect it to be slower than fp32")
    if len(models) > 1:
        chosen = threshold if threshold is not None else ensemble_threshold([d["threshold"] for d in described])
        size = overrides.get("min_lesion_size")
        size = size if size is not None else ensemble_min_lesion_size([m.min_lesion_size for m in member_settings])
        core = overrides.get("core_threshold")
        core = core if core is not None else ensemble_core_threshold([m.core_threshold for m in member_settings])
        settings = replace(settings, threshold=float(chosen), min_lesion_size=float(size), core_threshold=core)
        model: Any = Ensemble(models, member_settings)
    else:
        model = models[0]
    record = prediction_record(described, asdict(settings), layout)
    record["settings"]["device"] = device  # kept for the reader, not compared
    return model, settings, record
