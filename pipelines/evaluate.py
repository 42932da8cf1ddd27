"""Evaluate a folder of predicted masks against reference masks (MSSEG-style metrics).

Cases come either from a reference folder (every NIfTI file under it, paired by relative path:
reference ``X.nii.gz`` with prediction ``X_mask.nii.gz``, or ``X.nii.gz`` with the same name) or
from a manifest (the prediction of a case is ``pred_dir / output_path(image relative to root)``,
the rule of :mod:`planar3d.naming`). A case whose prediction is missing, unreadable, or does not
have the reference's shape and affine is reported as *failed* with its reason, never skipped.

Outputs in ``out_dir`` (each written atomically): ``metrics.csv`` (one row per case),
``summary.json`` (cases, per-group and overall statistics, metric definitions and parameters),
``report.md`` (Markdown tables with links to the QC pictures) and ``qc/<case>.png``.

Example:
    >>> result = evaluate_folder("preds", ref_dir="labels", out_dir="preds/evaluation")  # doctest: +SKIP
    >>> print(result.markdown_summary())                                                 # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence

import numpy as np

from planar3d.errors import ConfigError, InputError
from planar3d.io import atomic_write_text, check_output_folder, make_folder, read_volume, voxel_spacing, write_json
from planar3d.metrics import DEFINITIONS, METRIC_NAMES, case_metrics
from planar3d.metrics.lesion import DetectionParameters
from planar3d.naming import PROBABILITY_SUFFIX, case_id, is_nifti, output_path, strip_nifti_extension

#: Largest difference allowed between a prediction's and its reference's affine entries (mm).
AFFINE_TOLERANCE = 1e-3
#: Metrics shown in the per-case and per-group tables of report.md (summary.json has all).
REPORT_METRICS = (
    "dice", "sensitivity", "ppv", "rvd", "hd95", "assd", "n_ref", "n_pred",
    "lesion_sensitivity", "lesion_ppv", "lesion_f1",
)


@dataclass
class CaseResult:
    """Outcome for one case: ``metrics`` when it was evaluated, else ``error`` says why not."""

    id: str
    prediction: Path
    reference: Optional[Path]
    group: Optional[str] = None
    image: Optional[Path] = None
    metrics: Optional[Dict[str, float]] = None
    error: Optional[str] = None
    qc: Optional[str] = None  # path of the QC picture relative to out_dir

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class EvaluationResult:
    """Per-case results and their statistics (see :func:`summarise`)."""

    cases: List[CaseResult]
    overall: Dict[str, Dict[str, Optional[float]]]
    groups: Dict[str, Dict[str, Dict[str, Optional[float]]]]
    parameters: Dict[str, object]
    unpaired_predictions: List[str] = field(default_factory=list)
    unlabeled_cases: List[str] = field(default_factory=list)
    out_dir: Optional[Path] = None

    @property
    def failed(self) -> List[CaseResult]:
        return [case for case in self.cases if not case.ok]

    def markdown_summary(self) -> str:
        """Overall table (mean ± std, counts) and the list of failed cases, in Markdown."""
        lines = [f"Evaluated {len(self.cases) - len(self.failed)} of {len(self.cases)} cases.", ""]
        lines += _overall_table(self.overall)
        if self.failed:
            lines += ["", f"**{len(self.failed)} failed case(s):**", ""]
            lines += [f"- `{case.id}`: {case.error}" for case in self.failed]
        return "\n".join(lines) + "\n"


# --- statistics -------------------------------------------------------------------------------


def summarise(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and population std (ddof=0) over the *finite* values, with explicit counts.

    Returns:
        ``{"mean", "std", "n", "n_cases", "n_undefined"}``: ``n`` finite values used, ``n_cases``
        values given, ``n_undefined`` = nan or ±inf values (not averaged, but counted). ``mean``
        and ``std`` are None when no value is finite.
    """
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "n": int(finite.size),
        "n_cases": int(array.size),
        "n_undefined": int(array.size - finite.size),
    }


def _statistics(cases: Sequence[CaseResult]) -> Dict[str, Dict[str, Optional[float]]]:
    done = [case for case in cases if case.ok]
    return {name: summarise([case.metrics[name] for case in done]) for name in METRIC_NAMES}


# --- pairing ------------------------------------------------------------------------------------


def _nifti_files(folder: Path) -> List[PurePosixPath]:
    return sorted(
        PurePosixPath(path.relative_to(folder).as_posix())
        for path in folder.rglob("*")
        if path.is_file() and is_nifti(path.name) and not path.name.startswith(".")
    )


def _is_probability(relative: PurePosixPath) -> bool:
    return strip_nifti_extension(relative).name.lower().endswith((PROBABILITY_SUFFIX, "_probseg"))


def _predictions_by_case_id(pred_dir: Path, out_dir: Optional[Path]) -> Dict[str, Optional[PurePosixPath]]:
    """``{case id: prediction}`` of the predicted masks (any layout); an id shared by two files maps to None."""
    index: Dict[str, Optional[PurePosixPath]] = {}
    for relative in _nifti_files(pred_dir):
        inside_out = out_dir is not None and (pred_dir / relative).resolve().is_relative_to(out_dir.resolve())
        if inside_out or _is_probability(relative):
            continue
        key = case_id(relative, "mask")
        index[key] = None if key in index else relative
    return index


def _pairs_from_folder(pred_dir: Path, ref_dir: Path, out_dir: Optional[Path]) -> tuple[List[CaseResult], List[str]]:
    """Pair each reference with its prediction: the same relative path (``x.nii.gz`` or
    ``x_mask.nii.gz``), else the same case id (:func:`planar3d.naming.case_id`), which pairs
    nnU-Net ``labelsTr/case.nii.gz``, ``planar3d synth`` ``labels/case_000_lesions.nii.gz`` and BIDS
    ``*_desc-lesion_mask`` with predictions in any ``--layout``."""
    if not ref_dir.is_dir():
        raise InputError(ref_dir, "reference folder not found")
    cases, used = [], set()
    by_id = None
    for relative in _nifti_files(ref_dir):
        candidates = [PurePosixPath(output_path(relative).as_posix()), relative]
        found = next((c for c in candidates if (pred_dir / c).is_file()), None)
        if found is None:
            by_id = _predictions_by_case_id(pred_dir, out_dir) if by_id is None else by_id
            found = by_id.get(case_id(relative, "mask"))
        case = CaseResult(str(strip_nifti_extension(relative)), pred_dir / (found or candidates[0]), ref_dir / relative)
        if found is None:
            case.error = (f"missing prediction (looked for {candidates[0]}, {candidates[1]} and case id "
                          f"{case_id(relative, 'mask')!r} in {pred_dir})")
        else:
            used.add(found)
        cases.append(case)
    if not cases:
        raise InputError(ref_dir, "no NIfTI reference (.nii or .nii.gz) found")
    unpaired = []
    for relative in _nifti_files(pred_dir):
        inside_out = out_dir is not None and (pred_dir / relative).resolve().is_relative_to(out_dir.resolve())
        if relative not in used and not inside_out and not _is_probability(relative):
            unpaired.append(str(relative))
    return cases, unpaired


def _pairs_from_manifest(
    pred_dir: Path, manifest_path: Path, root: Optional[Path], fold: Optional[int]
) -> tuple[List[CaseResult], List[str]]:
    from planar3d.data.manifest import load_manifest

    manifest = load_manifest(manifest_path, root=root)
    selected = manifest.cases if fold is None else manifest.test_cases(fold)
    cases, unlabeled = [], []
    for case in selected:
        if case.label is None:
            unlabeled.append(case.id)
            continue
        relative = output_path(Path(case.image).relative_to(manifest.root))
        result = CaseResult(case.id, pred_dir / relative, case.label, group=case.group, image=case.image)
        if not result.prediction.is_file():
            result.error = f"missing prediction {result.prediction}"
        cases.append(result)
    if not cases:
        raise InputError(manifest_path, "no case to evaluate" + (f" in fold {fold}" if fold is not None else ""))
    return cases, unlabeled


# --- one case -----------------------------------------------------------------------------------


def _evaluate_case(case: CaseResult, params: DetectionParameters, qc_dir: Optional[Path]) -> None:
    try:
        ref, ref_image = read_volume(case.reference, dtype=None)
        pred, pred_image = read_volume(case.prediction, dtype=None)
        if pred.shape != ref.shape:
            raise InputError(case.prediction, f"shape {pred.shape} differs from the reference's {ref.shape} ({case.reference})")
        if not np.allclose(pred_image.affine, ref_image.affine, rtol=0, atol=AFFINE_TOLERANCE):
            raise InputError(case.prediction, f"affine differs from the reference's ({case.reference})")
    except InputError as error:
        case.error = str(error)
        return
    spacing = voxel_spacing(ref_image)
    ref_mask, pred_mask = ref > 0, pred > 0
    case.metrics = case_metrics(pred_mask, ref_mask, spacing, params)
    if qc_dir is not None:
        from planar3d.qc import save_ras_overlay_png

        flair = None
        if case.image is not None:
            try:
                flair, _ = read_volume(case.image)
            except InputError:
                flair = None
            if flair is not None and flair.shape != ref.shape:
                flair = None
        name = case.id.replace("/", "__") + ".png"
        # the one QC convention (as predict): RAS+ display with orientation labels
        save_ras_overlay_png(flair, {"reference": ref_mask, "prediction": pred_mask}, ref_image.affine, qc_dir / name)
        case.qc = f"qc/{name}"


# --- main entry ---------------------------------------------------------------------------------


def evaluate_folder(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    fold: Optional[int] = None,
    out_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    qc: bool = True,
    min_lesion_size: float = DetectionParameters.min_lesion_size,
) -> EvaluationResult:
    """Evaluate every case and (with ``out_dir``) write metrics.csv, summary.json, report.md, qc/.

    Args:
        pred_dir: folder of predicted masks.
        ref_dir: folder of reference masks (exclusive with ``manifest``).
        manifest: a manifest file; its labeled cases (or the test cases of ``fold``) are evaluated;
            unlabeled cases are listed in ``result.unlabeled_cases``, not evaluated.
        fold: with ``manifest``, evaluate only that fold's test cases.
        out_dir: where to write the outputs; nothing is written when None.
        root: with ``manifest``, the data folder overriding the manifest's root.
        qc: draw QC pictures (only with ``out_dir``).
        min_lesion_size: lesion-wise metrics ignore components of at most this volume (mm³).

    Returns:
        The per-case results and statistics. Failed cases are in ``result.failed``.

    Raises:
        InputError: missing prediction or reference folder, bad manifest, no case found.
        ConfigError: neither or both of ``ref_dir`` and ``manifest``.
    """
    if (ref_dir is None) == (manifest is None):
        raise ConfigError("give exactly one of a reference folder and a manifest")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "prediction folder not found")
    out = check_output_folder(out_dir) if out_dir is not None else None  # one line naming it, before any case is read
    unpaired: List[str] = []
    unlabeled: List[str] = []
    if ref_dir is not None:
        cases, unpaired = _pairs_from_folder(pred_dir, Path(ref_dir), out)
    else:
        cases, unlabeled = _pairs_from_manifest(pred_dir, Path(manifest), Path(root) if root is not None else None, fold)
    params = DetectionParameters(min_lesion_size=float(min_lesion_size))
    qc_dir = None
    if out is not None:
        if qc:
            qc_dir = make_folder(out / "qc")
    for case in cases:
        if case.ok:
            _evaluate_case(case, params, qc_dir)
    groups: Dict[str, List[CaseResult]] = {}
    for case in cases:
        if case.group is not None:
            groups.setdefault(str(case.group), []).append(case)
    result = EvaluationResult(
        cases=cases,
        overall=_statistics(cases),
        groups={name: _statistics(members) for name, members in sorted(groups.items())},
        parameters={
            "min_lesion_size_mm3": params.min_lesion_size, "alpha": params.alpha, "beta": params.beta,
            "gamma": params.gamma, "connectivity": 6, "surface_connectivity": 6,
            "hausdorff_percentile": 95, "binarisation": "voxel value > 0",
            "std": "population (ddof=0) over finite values", "fold": fold,
        },
        unpaired_predictions=unpaired,
        unlabeled_cases=unlabeled,
        out_dir=out,
    )
    if out is not None:
        write_outputs(result, out)
    return result


# --- outputs ------------------------------------------------------------------------------------


def _json_number(value: Optional[float]) -> object:
    """JSON has no nan/inf: they are written as the strings "nan", "inf", "-inf"."""
    if value is None or isinstance(value, int) or math.isfinite(value):
        return value
    return str(value)


def _format(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _mean_std(stats: Dict[str, Optional[float]]) -> str:
    if stats["mean"] is None:
        return "—"
    return f"{stats['mean']:.4g} ± {stats['std']:.3g}"


def _overall_table(overall: Dict[str, Dict[str, Optional[float]]]) -> List[str]:
    lines = ["| metric | mean ± std | n | undefined |", "|---|---|---|---|"]
    for name in METRIC_NAMES:
        stats = overall[name]
        lines.append(f"| {name} | {_mean_std(stats)} | {stats['n']} | {stats['n_undefined']} |")
    return lines


def _case_dict(case: CaseResult) -> Dict[str, object]:
    return {
        "id": case.id, "group": case.group, "status": "ok" if case.ok else "failed", "error": case.error,
        "prediction": str(case.prediction), "reference": str(case.reference) if case.reference else None,
        "qc": case.qc,
        "metrics": {k: _json_number(v) for k, v in case.metrics.items()} if case.metrics else None,
    }


def _stats_dict(stats: Dict[str, Dict[str, Optional[float]]]) -> Dict[str, object]:
    return {name: {k: _json_number(v) for k, v in values.items()} for name, values in stats.items()}


def metrics_csv_text(result: EvaluationResult) -> str:
    """The per-case CSV: id, group, status, error, prediction, reference, then every metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "group", "status", "error", "prediction", "reference", *METRIC_NAMES])
    for case in result.cases:
        values = [repr(float(case.metrics[n])) if case.metrics else "" for n in METRIC_NAMES]
        writer.writerow([case.id, case.group or "", "ok" if case.ok else "failed", case.error or "",
                         case.prediction, case.reference or "", *values])
    return buffer.getvalue()


def report_markdown(result: EvaluationResult) -> str:
    """report.md: overall, per-group and per-case tables, failures, unpaired predictions."""
    p = result.parameters
    lines = [
        "# Evaluation report", "",
        f"Lesion-wise: 6-connected components, ≤ {p['min_lesion_size_mm3']} mm³ removed, "
        f"alpha={p['alpha']}, beta={p['beta']}, gamma={p['gamma']}. Means and std (population) are over "
        "finite values; `undefined` counts nan/inf values (see docs/metrics.md).", "",
        "## Overall", "", *result.markdown_summary().rstrip("\n").split("\n"),
    ]
    if result.groups:
        names = list(result.groups)
        lines += ["", "## Per group (mean ± std, n / undefined)", "",
                  "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for metric in REPORT_METRICS:
            cells = [f"{_mean_std(result.groups[g][metric])} ({result.groups[g][metric]['n']}/"
                     f"{result.groups[g][metric]['n_undefined']})" for g in names]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", "## Per case", "", "| case | group | status | " + " | ".join(REPORT_METRICS) + " | QC |",
              "|---" * (len(REPORT_METRICS) + 4) + "|"]
    for case in result.cases:
        if case.ok:
            cells = [_format(case.metrics[m]) for m in REPORT_METRICS]
        else:
            cells = ["—"] * len(REPORT_METRICS)
        link = f"[png]({case.qc})" if case.qc else ""
        status = "ok" if case.ok else "failed"
        lines.append(f"| {case.id} | {case.group or ''} | {status} | " + " | ".join(cells) + f" | {link} |")
    if result.unpaired_predictions:
        lines += ["", "## Predictions without a reference (not evaluated)", ""]
        lines += [f"- `{name}`" for name in result.unpaired_predictions]
    if result.unlabeled_cases:
        lines += ["", "## Unlabeled cases (not evaluated)", ""]
        lines += [f"- `{name}`" for name in result.unlabeled_cases]
    return "\n".join(lines) + "\n"


def write_outputs(result: EvaluationResult, out_dir: str | os.PathLike) -> None:
    """Write metrics.csv, summary.json and report.md atomically into ``out_dir``."""
    out = Path(out_dir)
    atomic_write_text(out / "metrics.csv", metrics_csv_text(result))
    write_json(out / "summary.json", {
        "parameters": result.parameters,
        "definitions": DEFINITIONS,
        "n_cases": len(result.cases),
        "n_failed": len(result.failed),
        "cases": [_case_dict(case) for case in result.cases],
        "groups": {name: _stats_dict(stats) for name, stats in result.groups.items()},
        "overall": _stats_dict(result.overall),
        "unpaired_predictions": result.unpaired_predictions,
        "unlabeled_cases": result.unlabeled_cases,
    })
    atomic_write_text(out / "report.md", report_markdown(result))
