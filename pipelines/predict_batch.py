"""A batch of scans with a ready model: claims, reuse, threads, summaries and reports.

:func:`predict_with_model` reads the next scans and writes finished ones in worker threads while
the model runs on the current one (:mod:`planar3d.pipelining`), claims each scan before reading it
(:mod:`planar3d.claims`), reuses an existing output only when its sidecar shows the same model(s)
and settings (:func:`reusable`), records a failing scan and goes on (:data:`SCAN_ERRORS`), then
writes this worker's part summary, merges ``predictions.json`` (:mod:`planar3d.summaries`) and,
unsharded, the lesion report CSVs and QC page (:func:`write_batch_reports`). Its result is a
:class:`PredictionSummary`. The per-scan steps are :mod:`pipelines.predict_steps`; finding the
scans and loading the model(s) is :func:`pipelines.predict.predict_folder`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from planar3d.checkpoint import ModelCheckpoint
from planar3d.claims import ScanClaims
from planar3d.errors import InputError, Planar3DError, SummaryWriteError
from planar3d.inputs import Skipped
from planar3d.io import display_path, json_safe, make_folder, remove_stale_temporaries, write_json
from planar3d.naming import BIDS_DERIVATIVE_ROOT, write_dataset_description
from planar3d.pipelining import ReadAhead, WriteBehind, pipeline_workers
from planar3d.summaries import claims_folder, merge_part_summaries, part_file
from pipelines.predict_setup import InferenceSettings, ScanInput
from pipelines.predict_steps import STEPS, Ensemble, OutputPaths, PreparedScan, ScanResult, finish_scan, prepare_scan, run_model
from pipelines.prediction_record import prediction_record, read_sidecar, reuse_problem

#: Per-scan errors a batch records and goes past: any exception. A bug met on one scan (a
#: TypeError on an exotic file) must not cost the other scans of the batch nor its summary; it is
#: recorded with its type name. KeyboardInterrupt and SystemExit still stop the batch.
SCAN_ERRORS = (Exception,)


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
    from planar3d.lesion_report import report_from_files, with_brain_volume, write_report_csvs
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
            brain_mm3 = (sidecar.get("scan") or {}).get("brain_volume_mm3")
            if brain_mm3:  # made with a brain mask: its volume is in the record, not in a file
                scan_row = with_brain_volume(scan_row, float(brain_mm3))
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

    See :func:`pipelines.predict.predict_folder` for the arguments; ``scans`` are already found and sharded, and
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
        workers = pipeline_workers(str(settings.device).split(":")[0])
        with ReadAhead(lambda item: prepare_scan(item[1], settings, keep_raw), claimed_todo(), workers, workers) as reads, \
                WriteBehind(collect, workers, workers) as writes:
            reads.start()  # claim and decode the first scans while the model warms up
            if todo:
                for member in (model.models if isinstance(model, Ensemble) else [model]):
                    warm_up(member, settings.device, settings.in_channels, settings.precision)
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

