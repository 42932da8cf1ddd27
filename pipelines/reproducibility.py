"""The Machine Learning Reproducibility Checklist, filled from what a rerun actually did.

Every entry comes from the run itself: the experiment file and resolved training config, the
network built, the package versions imported, the git commit of the code, the machine, the
data headers and checksums, and the measured runtimes. Nothing is typed in by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from planar3d.io import write_json, atomic_write_text, sha256_file
from planar3d.provenance import git_state, machine_info, package_versions


def _network_summary(records: List[dict]) -> Dict[str, object]:
    """Network config, parameter count and encoder source from the first run's checkpoint."""
    from planar3d.checkpoint import load_model
    from planar3d.networks.res_unet import count_parameters

    if not records:
        return {}
    model, checkpoint = load_model(records[0]["best_checkpoint"])
    data = checkpoint.to_dict()
    training = checkpoint.training  # written by pipelines.train_records.model_checkpoint: every key is there
    return {
        "name": "planar 3D res-u-net (VGG-16 blocks 1-4 with planar kernels, residual-concatenation decoder)",
        "parameters": count_parameters(model),
        "network_config": data["network"],
        "encoder_source": training["encoder_source"],
        "normalization": data["normalization"],
        "orientation": data["orientation"],
        "threshold": data["threshold"],
        "inference": data["inference"],
        "training_config": training["config"],
        "epochs_trained": training["epoch"],
    }


def _preprocessing(records: List[dict]) -> str:
    """The preprocessing the runs' checkpoints record (the normalisation method is configurable)."""
    from planar3d.checkpoint import ModelCheckpoint

    method = ModelCheckpoint.load(records[0]["best_checkpoint"]).normalization.method if records else "configured"
    return (f"exact reorientation to RAS (axis permutation/flip, inverted on output), {method} intensity "
            "normalisation (planar3d.preprocess); no resampling, no brain extraction")


def build_report(experiment, experiment_file: Path, manifest_path: Path, root: Optional[Path], records: List[dict],
                 results: Dict[str, object], checksums: Dict[str, object], dataset: Dict[str, object]) -> Dict[str, object]:
    """Assemble the checklist dict (see module docstring)."""
    from planar3d.metrics import DEFINITIONS

    runtimes = [sum(r["seconds"].values()) for r in records if not r.get("skipped") and "seconds" in r]
    return {
        "experiment": {"name": experiment.name, "description": experiment.description, "file": str(experiment_file),
                       "file_sha256": sha256_file(experiment_file), "settings": experiment.model_dump()},
        "model_and_algorithm": _network_summary(records),
        "hyperparameters": {"training_config": experiment.train.config, "overrides": experiment.train.overrides,
                            "searched_ranges": experiment.searched or "none searched: settings fixed in advance"},
        "runs": {
            "folds": sorted({r["fold"] for r in records}), "seeds": sorted({r["seed"] for r in records}),
            "count": len(records),
            "per_run": [{"fold": r["fold"], "seed": r["seed"], "seconds": r.get("seconds"), "reused_from_earlier_rerun": r.get("skipped", False)} for r in records],
            "mean_runtime_seconds_this_rerun": (sum(runtimes) / len(runtimes)) if runtimes else None,
        },
        "metrics": {"definitions": DEFINITIONS, "variation": "mean ± population std over test cases (per group and overall) and over group means"},
        "results": results,
        "hardware": machine_info(),
        "software": {"packages": package_versions(), "code": git_state(Path(__file__).resolve().parent)},
        "dataset": dataset,
        "splits": {"manifest": str(manifest_path), "root": str(root) if root else None, "folds": dataset.get("folds")},
        "preprocessing": _preprocessing(records),
        "data_checksums": checksums,
    }


def _format(stats: Dict[str, object]) -> str:
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


TABLE_METRICS = ("dice", "sensitivity", "ppv", "lesion_sensitivity", "lesion_ppv", "lesion_f1", "hd95", "assd", "avd_rel")
"""Columns of the Markdown results table (the JSON holds every metric)."""


def markdown(report: Dict[str, object]) -> str:
    """The checklist as a Markdown page."""
    results = report["results"]
    metrics = [m for m in TABLE_METRICS if m in results["overall"]]
    groups = list(results["groups"])
    lines = [f"# Reproducibility report: {report['experiment']['name']}", "", report["experiment"]["description"], "",
             "## Results (mean ± std)", "", "| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for group in groups:
        lines.append(f"| group {group} | " + " | ".join(_format(results["groups"][group][m]) for m in metrics) + " |")
    lines.append("| all cases | " + " | ".join(_format(results["overall"][m]) for m in metrics) + " |")
    lines.append("| across groups | " + " | ".join(_format(results["across_groups"][m]) for m in metrics) + " |")
    comparison = report.get("comparison")
    if comparison:
        lines += ["", f"Comparison with `{comparison['reference']}`: "
                  + ("all within tolerance." if not comparison["disagreements"] else "DISAGREES:")]
        lines += [f"- {d}" for d in comparison["disagreements"]]
    model = report["model_and_algorithm"]
    software = report["software"]
    dataset = report["dataset"]
    lines += [
        "", "## Checklist", "",
        f"- **Model**: {model.get('name')}; {model.get('parameters'):,} parameters; encoder weights: {model.get('encoder_source')}." if model else "- **Model**: (no run)",
        f"- **Algorithm / hyper-parameters**: training config `{report['hyperparameters']['training_config']}` with overrides {report['hyperparameters']['overrides']}; full resolved config in the JSON (`model_and_algorithm.training_config`).",
        f"- **Searched ranges**: {report['hyperparameters']['searched_ranges']}.",
        f"- **Runs**: {report['runs']['count']} (folds {report['runs']['folds']} x seeds {report['runs']['seeds']}); mean runtime per run this rerun: {report['runs']['mean_runtime_seconds_this_rerun'] and round(report['runs']['mean_runtime_seconds_this_rerun'], 1)} s.",
        f"- **Metrics**: {', '.join(report['metrics']['definitions'])}; definitions in the JSON and docs/metrics.md; variation: {report['metrics']['variation']}.",
        f"- **Hardware**: {report['hardware']['processor']}, {report['hardware']['cpu_count']} CPUs, {report['hardware'].get('memory_gib')} GiB, GPU: {report['hardware']['gpu'] or 'none'}.",
        "- **Software**: " + ", ".join(f"{k} {v}" for k, v in software["packages"].items()) + ".",
        f"- **Code version**: commit {software['code']['commit']}{' (dirty tree)' if software['code']['dirty'] else ''}.",
        f"- **Dataset**: {dataset['dataset']}, {dataset['cases']} cases ({dataset['labeled_cases']} labeled), groups {dataset['groups']}, lesion load (mm³) {dataset['lesion_load_mm3']}; voxel sizes per case in the JSON.",
        f"- **Splits**: {len(dataset['folds'])} folds from `{report['splits']['manifest']}`: {dataset['folds']}.",
        f"- **Preprocessing**: {report['preprocessing']}.",
        f"- **Data checksums**: {sum(1 for f in report['data_checksums']['files'].values() if f['verified'])} of {len(report['data_checksums']['files'])} files verified against recorded SHA-256 before training; manifest sha256 {report['data_checksums']['manifest_sha256']}.",
    ]
    return "\n".join(lines) + "\n"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_report(report: Dict[str, object], out_dir: Path) -> None:
    """``reproducibility.json`` and ``reproducibility.md`` in ``out_dir`` (atomically)."""
    write_json(out_dir / "reproducibility.json", _jsonable(json.loads(json.dumps(report, default=str))))
    atomic_write_text(out_dir / "reproducibility.md", markdown(report))
