"""Would a component-confidence rule (hysteresis) cut false-positive lesions on new scans? (issue 9)

``planar3d predict`` keeps ``probability > t`` without the 6-connected components of at most
``m`` mm³. Hysteresis thresholding also drops the components whose highest probability is at
most a core threshold ``h >= t``: a real lesion has a confident core, a spurious blob often does
not. For each trained run this study:

1. predicts (whole volume, the run's own settings, as ``planar3d predict``) its validation cases
   (``run.json`` ``split.validation``, read from its training manifest) and the test cases of
   ``--manifest``, cached as float16 under ``--cache``;
2. chooses ``(t, m)`` on the validation cases by mean lesion-wise F1 as training does
   (:func:`planar3d.thresholds.choose_threshold`) -- the **base** rule -- and ``(t, m, h)`` with
   ``h`` from ``--cores`` or none -- the **hysteresis** rule, what the default config now does;
3. scores the test cases with each choice: per manifest, mean Dice and lesion F1, lesion PPV of
   its light cases (< 0.2 % load) and lesion F1 of its heavy ones (>= 1 %).

``--criteria lesion_f1,dice_and_f1`` adds a hysteresis row for each further criterion of
:data:`planar3d.thresholds.CRITERIA` (``validation.criterion``): the same checkpoint, its
post-processing chosen by that criterion instead (its best epoch was chosen by the run's own).

Validation can always fall back to no core threshold, so any change on the test cases is what
the choice transfers to new scans. Measured effect: docs/training.md, "Issue 9, sixth session".

Usage:
    python benchmarks/hysteresis_study.py --run RUN [--run RUN2 ...] --manifest TEST.json [--manifest ...]
        [--cache DIR] [--cores 0.5,0.6,0.7,0.8,0.9,0.95] [--criteria lesion_f1,dice_and_f1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def cache_probabilities(run: Path, manifests: Sequence[Path], cache: Path) -> Dict[str, List[dict]]:
    """``{"validation": [...], manifest path: [...]}``, each case a dict of ``prob`` (float32),
    ``label``, ``spacing``, ``load``, ``id``; predicted once per run and case, then read back."""
    from planar3d.data.manifest import load_manifest
    from planar3d.data.synth import case_lesion_load
    from planar3d.io import read_volume
    from pipelines.predict import load_models
    from pipelines.predict_setup import ScanInput
    from pipelines.predict_steps import prepare_scan, run_model

    info = json.loads((run / "run.json").read_text())
    by_id = {c.id: c for c in load_manifest(info["manifest"]["path"]).cases}
    groups = {"validation": [by_id[i] for i in info["split"]["validation"]]}
    for manifest in manifests:
        groups[str(manifest)] = [c for c in load_manifest(manifest).cases if c.label is not None]
    model = settings = None
    folder = cache / run.name
    folder.mkdir(parents=True, exist_ok=True)
    cases: Dict[str, List[dict]] = {}
    for group, members in groups.items():
        cases[group] = []
        for case in members:
            path = folder / f"{'val' if group == 'validation' else 'test'}__{case.id}.npz"
            if not path.exists():
                if model is None:
                    model, settings, _ = load_models([run / "best.pt"], "cpu")
                prepared = prepare_scan(ScanInput(Path(case.image), PurePosixPath(Path(case.image).name)), settings)
                label = prepared.reorientation.forward(read_volume(case.label)[0]) > 0
                probability = run_model(model, prepared, settings)
                np.savez_compressed(path, prob=probability.astype(np.float16), label=label,
                                    spacing=np.asarray(prepared.reorientation.spacing, float),
                                    load=case_lesion_load(case.image, case.label))
            stored = np.load(path)
            cases[group].append({"id": case.id, "prob": stored["prob"].astype(np.float32), "label": stored["label"],
                                 "spacing": tuple(float(s) for s in stored["spacing"]), "load": float(stored["load"])})
    return cases


def mask(case: dict, threshold: float, min_size: float, core: Optional[float]) -> np.ndarray:
    """What ``planar3d predict`` writes for the case with that post-processing."""
    from pipelines.predict_steps import lesion_mask

    return lesion_mask(case["prob"], threshold, case["spacing"], min_size, core)[0]


def score(mask: np.ndarray, case: dict) -> dict:
    from planar3d.metrics.lesion import lesion_metrics
    from planar3d.metrics.voxel import dice

    lesions = lesion_metrics(mask, case["label"], case["spacing"])
    return {"dice": float(dice(mask, case["label"])), "lesion_f1": float(lesions["lesion_f1"]),
            "lesion_ppv": float(lesions["lesion_ppv"]), "n_pred": float(lesions["n_pred"]), "load": case["load"]}


def choose(validation: Sequence[dict], thresholds, sizes, cores, criterion: str = "lesion_f1") -> tuple:
    """``(t, m, h, criterion's score)`` as training chooses them (:func:`planar3d.thresholds.choose_threshold`)."""
    from planar3d.thresholds import choose_threshold

    choice = choose_threshold([c["prob"] for c in validation], [c["label"] for c in validation],
                              [c["spacing"] for c in validation], thresholds, criterion,
                              min_lesion_sizes=sizes, core_thresholds=cores)
    return choice.threshold, choice.min_lesion_size, choice.core_threshold, choice.score


def main() -> None:
    from planar3d.data.synth import HEAVY_LOAD_MIN, LIGHT_LOAD_MAX

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, action="append", help="a run folder (best.pt, run.json)")
    parser.add_argument("--manifest", type=Path, required=True, action="append", help="test cases (repeatable)")
    parser.add_argument("--cache", type=Path, default=None, help="probability cache (default: a temporary folder)")
    parser.add_argument("--cores", default="0.5,0.6,0.7,0.8,0.9,0.95", help="core thresholds to choose from")
    parser.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--sizes", default="3,6,10,15,20,30", help="minimum lesion sizes, mm³")
    parser.add_argument("--criteria", default="lesion_f1",
                        help="validation criteria (planar3d.thresholds.CRITERIA); each after the first adds a hysteresis row")
    args = parser.parse_args()
    from planar3d.thresholds import CRITERIA

    criteria = [c for c in args.criteria.split(",") if c]
    if not criteria or any(c not in CRITERIA for c in criteria):
        parser.error(f"--criteria: a comma-separated subset of {', '.join(CRITERIA)}, got {args.criteria!r}")
    thresholds = [float(v) for v in args.thresholds.split(",")]
    sizes = [float(v) for v in args.sizes.split(",")]
    cores = [float(v) for v in args.cores.split(",") if v]
    rules = [("base", criteria[0], []), ("hysteresis", criteria[0], cores)]
    rules += [(f"hysteresis, {c}", c, cores) for c in criteria[1:]]
    with tempfile.TemporaryDirectory(prefix="hysteresis_") as tmp:
        cache = args.cache or Path(tmp)
        print("| run | rule | t | min mm³ | core | validation score | " + " | ".join(
            f"{m.stem}: Dice / F1 / light PPV / heavy F1 / lesions" for m in args.manifest) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(args.manifest))
        for run in args.run:
            cases = cache_probabilities(run, args.manifest, cache)
            for rule, criterion, allowed in rules:
                t, m, h, validation_score = choose(cases["validation"], thresholds, sizes, allowed, criterion)
                cells = []
                for manifest in args.manifest:
                    rows = [score(mask(c, t, m, h), c) for c in cases[str(manifest)]]
                    light = [r["lesion_ppv"] for r in rows if r["load"] < LIGHT_LOAD_MAX]
                    heavy = [r["lesion_f1"] for r in rows if r["load"] >= HEAVY_LOAD_MIN]
                    cells.append(f"{np.mean([r['dice'] for r in rows]):.3f} / {np.mean([r['lesion_f1'] for r in rows]):.3f} / "
                                 f"{np.nanmean(light) if light else float('nan'):.3f} / {np.mean(heavy) if heavy else float('nan'):.3f} / "
                                 f"{sum(r['n_pred'] for r in rows):.0f}")
                print(f"| {run.name} | {rule} | {t:g} | {m:g} | {'-' if h is None else f'{h:g}'} | {validation_score:.3f} | "
                      + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
