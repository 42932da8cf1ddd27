"""``planar3d rerun``: run every fold x seed of an experiment, aggregate, and prove what ran.

For each fold and seed the run folder ``<out>/runs/fold<K>_seed<S>/`` gets ``train/`` (the
training run), ``predictions/`` (masks of the fold's test cases) and ``evaluation/``; a run is
complete when ``complete.json`` is there (written atomically last) with the same settings
fingerprint, so a killed rerun resumes where it stopped (training itself resumes from
``last.pt``). Data checksums are verified before any training: a manifest whose files no longer
match stops the rerun.

Aggregation pools every test case of every fold per seed (each case is tested once per seed in
cross-validation), then reports mean ± std per metric per group (e.g. acquisition center), over
all cases, and across group means (as Table II of the paper). ``reproducibility.json`` and
``reproducibility.md`` fill the Machine Learning Reproducibility Checklist from what actually ran.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from planar3d.errors import ConfigError, InputError
from planar3d.io import check_output_folder, json_safe, load_image, sha256_file, voxel_spacing, write_json
from pipelines.experiment import Experiment, load_experiment, resolve

COMPLETE = "complete.json"


def _fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_data(experiment: Experiment, experiment_file: Path, out_dir: Path) -> Path:
    """The manifest the experiment runs on (synthetic data is generated once into ``out/data``)."""
    if experiment.data.manifest is not None:
        return resolve(experiment.data.manifest, experiment_file)
    from planar3d.data.synth import write_synthetic_dataset

    manifest = out_dir / "data" / "manifest.json"
    if not manifest.is_file():
        spec = experiment.data.synthetic
        write_synthetic_dataset(
            out_dir / "data", cases=spec.cases, seed=spec.seed, size=spec.size,
            geometries=tuple(spec.geometries), orientations=tuple(spec.orientations),
        )
    return manifest


def verify_data(manifest_path: Path, root: Optional[Path]) -> Dict[str, object]:
    """Check every file against its recorded checksum; stop (``InputError``) on any problem.

    Returns the checksums actually found, for the checklist; files without a recorded checksum
    are hashed and reported as such.
    """
    from planar3d.data.manifest import load_manifest, verify_manifest

    manifest = load_manifest(manifest_path, root=root)
    problems = verify_manifest(manifest)
    if problems:
        raise InputError(manifest_path, "data do not match the manifest, nothing was trained:\n  " + "\n  ".join(problems))
    files = {}
    for case in manifest.cases:
        for role in ("image", "label"):
            path = getattr(case, role)
            if path is None:
                continue
            recorded = (case.sha256 or {}).get(role)
            files[f"{case.id}/{role}"] = {"sha256": recorded or sha256_file(path), "verified": recorded is not None}
    return {"manifest": str(manifest_path), "manifest_sha256": sha256_file(manifest_path), "files": files}


def dataset_statistics(manifest_path: Path, root: Optional[Path]) -> Dict[str, object]:
    """Cases, groups, voxel sizes and lesion loads (mm³) read from the headers and labels."""
    from planar3d.data.manifest import load_manifest

    manifest = load_manifest(manifest_path, root=root)
    cases = []
    for case in manifest.cases:
        image = load_image(case.image)
        entry = {"id": case.id, "group": case.group, "shape": list(image.shape[:3]), "spacing_mm": [round(s, 4) for s in voxel_spacing(image)]}
        if case.label is not None:
            label = load_image(case.label)
            voxels = int(np.count_nonzero(np.asanyarray(label.dataobj)))
            entry["lesion_load_mm3"] = round(voxels * float(np.prod(voxel_spacing(label))), 1)
        cases.append(entry)
    loads = [c["lesion_load_mm3"] for c in cases if "lesion_load_mm3" in c]
    return {
        "dataset": manifest.dataset,
        "cases": len(cases),
        "labeled_cases": len(loads),
        "groups": sorted({str(c["group"]) for c in cases}),
        "lesion_load_mm3": {"min": min(loads), "median": float(np.median(loads)), "max": max(loads)} if loads else None,
        "per_case": cases,
        "folds": manifest.folds,
    }


def run_one(experiment: Experiment, manifest_path: Path, root: Optional[Path], fold: int, seed: int, run_dir: Path) -> dict:
    """Train, predict and evaluate one fold x seed unless already complete; returns its record."""
    from pipelines.config import load_config
    from pipelines.evaluate import evaluate_folder
    from pipelines.predict import predict_folder
    from pipelines.train import train

    settings = {"train": experiment.train.model_dump(), "predict": experiment.predict.model_dump(),
                "evaluate": experiment.evaluate.model_dump(), "fold": fold, "seed": seed,
                "manifest_sha256": sha256_file(manifest_path)}
    fingerprint = _fingerprint(settings)
    marker = run_dir / COMPLETE
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == fingerprint:
            record["skipped"] = True
            return record
    start = time.perf_counter()
    config = load_config(experiment.train.config, [*experiment.train.overrides, f"seed={seed}",
                                                    f"deterministic={str(experiment.train.deterministic).lower()}"])
    best = train(
        manifest_path, fold, run_dir / "train", config, root=root,
        resume=(run_dir / "train" / "last.pt").is_file(), overwrite=not (run_dir / "train" / "last.pt").is_file(),
        device=experiment.train.device,
        encoder_weights=experiment.train.encoder_weights,
    )
    trained = time.perf_counter()
    prediction = predict_folder(
        manifest_path, run_dir / "predictions", best, fold=fold, root=root, device=experiment.train.device or "auto",
        threshold=experiment.predict.threshold, min_lesion_size=experiment.predict.min_lesion_size,
        tta=experiment.predict.tta, overwrite=True,
    )
    if prediction.failed:
        raise InputError(run_dir / "predictions", f"{len(prediction.failed)} scans failed to predict; see predictions.json")
    predicted = time.perf_counter()
    evaluation = evaluate_folder(
        run_dir / "predictions", manifest=manifest_path, fold=fold, root=root, out_dir=run_dir / "evaluation",
        qc=False, min_lesion_size=experiment.evaluate.min_lesion_size,
    )
    if evaluation.failed:
        raise InputError(run_dir / "evaluation", f"{len(evaluation.failed)} cases failed to evaluate; see summary.json")
    record = {
        "fold": fold, "seed": seed, "fingerprint": fingerprint, "skipped": False,
        "seconds": {"train": trained - start, "predict": predicted - trained, "evaluate": time.perf_counter() - predicted},
        "best_checkpoint": str(best),
        "cases": [{"id": c.id, "group": c.group, "metrics": c.metrics} for c in evaluation.cases],
    }
    # undefined metrics (nan) are written as null; summarise() reads null back as undefined
    write_json(marker, json_safe(record))
    return record


def aggregate(records: List[dict]) -> Dict[str, object]:
    """Mean ± std per metric per group, over all cases, and across group means (per seed pooled)."""
    from pipelines.evaluate import summarise

    cases = [dict(case, seed=record["seed"]) for record in records for case in record["cases"]]
    metrics = sorted({name for case in cases for name in (case["metrics"] or {})})
    groups = sorted({str(case["group"]) for case in cases})
    result: Dict[str, object] = {"overall": {}, "groups": {g: {} for g in groups}, "across_groups": {}}
    for name in metrics:
        values = [case["metrics"][name] for case in cases]
        result["overall"][name] = summarise(values)
        group_means = []
        for group in groups:
            group_values = [c["metrics"][name] for c in cases if str(c["group"]) == group]
            stats = summarise(group_values)
            result["groups"][group][name] = stats
            if stats.get("mean") is not None:
                group_means.append(stats["mean"])
        result["across_groups"][name] = summarise(group_means)
    return result


def compare(results: Dict[str, object], reference_path: Path) -> List[str]:
    """Disagreements between ``results`` and a reference file (empty list: all within tolerance).

    Reference format::

        {"tolerance": 0.05,                                   # default absolute tolerance
         "overall": {"dice": {"mean": 0.61, "tolerance": 0.05}, ...},
         "groups": {"01": {"dice": {"mean": 0.69}}, ...}}
    """
    try:
        reference = json.loads(Path(reference_path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{reference_path}: cannot read the reference ({error})") from None
    default = float(reference.get("tolerance", 0.0))
    problems = []

    def check(where: str, expected: Dict[str, dict], actual: Dict[str, dict]) -> None:
        for metric, spec in expected.items():
            found = (actual.get(metric) or {}).get("mean")
            tolerance = float(spec.get("tolerance", default))
            if found is None:
                problems.append(f"{where} {metric}: expected {spec['mean']}, but it was not computed")
            elif abs(found - float(spec["mean"])) > tolerance:
                problems.append(f"{where} {metric}: {found:.4f} differs from {spec['mean']} by more than {tolerance}")

    check("overall", reference.get("overall", {}), results["overall"])
    for group, expected in reference.get("groups", {}).items():
        check(f"group {group}", expected, results["groups"].get(group, {}))
    return problems


def rerun(experiment_path: str | Path, out_dir: Optional[str | Path] = None, root: Optional[str | Path] = None,
          compare_with: Optional[str | Path] = None) -> Dict[str, object]:
    """Run (or resume) every fold x seed of an experiment and write the reproducibility report.

    Returns the report dict; its ``"comparison"`` entry lists disagreements with ``compare_with``.
    """
    from pipelines.reproducibility import build_report, write_report
    from planar3d.data.manifest import load_manifest

    experiment_file = Path(experiment_path).resolve()
    experiment = load_experiment(experiment_file)
    out_dir = check_output_folder(out_dir or Path("runs") / experiment.name)
    root = Path(root) if root else (resolve(experiment.data.root, experiment_file) if experiment.data.root else None)
    manifest_path = prepare_data(experiment, experiment_file, out_dir)
    checksums = verify_data(manifest_path, root)  # before any training
    manifest = load_manifest(manifest_path, root=root)
    folds = list(range(len(manifest.folds))) if experiment.folds == "all" else list(experiment.folds)
    for fold in folds:
        if not 0 <= fold < len(manifest.folds):
            raise ConfigError(f"{experiment_file}: fold {fold} does not exist ({manifest_path} has {len(manifest.folds)} folds)")
    records = [
        run_one(experiment, manifest_path, root, fold, seed, out_dir / "runs" / f"fold{fold}_seed{seed}")
        for seed in experiment.seeds for fold in folds
    ]
    results = aggregate(records)
    report = build_report(experiment, experiment_file, manifest_path, root, records, results, checksums,
                          dataset_statistics(manifest_path, root))
    if compare_with is not None:
        report["comparison"] = {"reference": str(compare_with), "disagreements": compare(results, Path(compare_with))}
    write_report(report, out_dir)
    return report
