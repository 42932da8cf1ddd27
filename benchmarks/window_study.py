"""Does the inference window change what a trained model segments on new scans? (issues 9 and 10)

A network with instance norm normalises each layer over the extent it is run on: training sees
patches, ``planar3d predict`` runs the whole volume (issue 10: the least work), validation in
training ran 32-plane slabs until the fifth session. This study runs one checkpoint with each
window of ``--windows``:

* ``whole``: one whole-volume pass (what ``planar3d predict`` does by default);
* ``slabN``: whole planes, N planes thick, overlap ``--overlap`` (the old validation setting: slab32);
* ``patch``: windows of the run's training patch size, overlap ``--overlap``, Gaussian blending
  (what nnU-Net does).

For each window the threshold and minimum lesion size are chosen again on the run's own
validation cases (``run.json`` ``split.validation``, read from the training manifest) with that
window and the run's criterion, exactly as training chooses them
(:func:`planar3d.thresholds.choose_threshold`); then the test cases are scored with that window
and that choice through ``benchmarks/score_cases.py``'s :func:`score_case`. So each row is what a
user would get had training and prediction both used that window.

Usage:
    python benchmarks/window_study.py --model RUN/last.pt --manifest TEST.json [--manifest TEST2.json]
        [--windows whole,slab32,patch] [--overlap 0.5] [--thresholds 0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_cases import score_case  # noqa: E402


def window_of(name: str, plane_axis: int, patch_size) -> tuple:
    """The ``roi_size`` of a window name (``whole``, ``slabN``, ``patch``)."""
    if name == "whole":
        return (-1, -1, -1)
    if name.startswith("slab") and name[4:].isdigit():
        return tuple(int(name[4:]) if axis == plane_axis else -1 for axis in range(3))
    if name == "patch":
        return tuple(int(s) for s in patch_size)
    raise SystemExit(f"unknown window {name!r}: whole, slabN or patch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint in a run folder (run.json beside it)")
    parser.add_argument("--manifest", type=Path, required=True, action="append", help="test cases (repeatable)")
    parser.add_argument("--windows", default="whole,slab32,patch")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--thresholds", default="",
                        help="comma-separated grid validation chooses from (default: the run's validation.thresholds); "
                             "'0.5' alone: only the minimum lesion size is chosen")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from pipelines.config import validate_config
    from pipelines.data import load_validation_volumes
    from pipelines.predict import load_models
    from planar3d.checkpoint import ModelCheckpoint
    from planar3d.data.manifest import load_manifest
    from planar3d.data.synth import LIGHT_LOAD_MAX
    from planar3d.inference import predict_probabilities
    from planar3d.thresholds import choose_threshold

    checkpoint = ModelCheckpoint.load(args.model)
    run = json.loads((args.model.parent / "run.json").read_text())
    config = validate_config(checkpoint.training["config"], str(args.model))
    plane_axis = int(checkpoint.network.plane_axis)
    by_id = {c.id: c for c in load_manifest(run["manifest"]["path"]).cases}
    validation = load_validation_volumes([by_id[i] for i in run["split"]["validation"]], config.normalization)
    grid = [float(t) for t in args.thresholds.split(",") if t] or list(config.validation.thresholds)
    tests = [c for m in args.manifest for c in load_manifest(m).cases if c.label is not None]
    print(f"model {args.model} (epoch {checkpoint.training['epoch']}), validation {len(validation)} case(s) of "
          f"{run['manifest']['path']}, criterion {config.validation.criterion}, thresholds {grid}, {len(tests)} test case(s)")
    print("| window | threshold | min size mm³ | validation score | " + " | ".join(c.id for c in tests)
          + " | light lesion PPV | seconds |")
    print("|---|---|---|---|" + "---|" * len(tests) + "---|---|")
    rows = []
    for name in args.windows.split(","):
        roi = window_of(name, plane_axis, config.data.patch_size)
        start = time.perf_counter()
        model, settings, _ = load_models([args.model], "cpu", roi_size=roi, overlap=args.overlap, precision="fp32")
        probabilities = [predict_probabilities(model, image, roi_size=None if roi == (-1, -1, -1) else roi,
                                               overlap=args.overlap, in_channels=settings.in_channels)
                         for _, image, _, _ in validation]
        choice = choose_threshold(probabilities, [v[2] for v in validation], [v[3] for v in validation],
                                  grid, config.validation.criterion,
                                  min_lesion_sizes=config.validation.min_lesion_sizes,
                                  core_thresholds=config.validation.core_thresholds)
        settings = dataclasses.replace(settings, threshold=choice.threshold, min_lesion_size=choice.min_lesion_size,
                                       core_threshold=choice.core_threshold)
        scored = [score_case(model, settings, case) for case in tests]
        light = [r["lesion_ppv"] for r in scored if r["load"] < LIGHT_LOAD_MAX]
        light_ppv = float(np.nanmean(light)) if light else float("nan")
        seconds = time.perf_counter() - start
        rows.append({"window": name, "roi_size": roi, "threshold": choice.threshold,
                     "min_lesion_size": choice.min_lesion_size, "core_threshold": choice.core_threshold,
                     "validation_score": choice.score,
                     "cases": scored, "light_lesion_ppv": light_ppv})
        print(f"| {name} {list(roi)} | {choice.threshold:g} | {choice.min_lesion_size:g} | {choice.score:.3f} | "
              + " | ".join(f"{r['dice']:.3f} / {r['lesion_f1']:.3f} / {r['n_pred']:.0f}" for r in scored)
              + f" | {light_ppv:.3f} | {seconds:.0f} |", flush=True)
    print("cells: Dice / lesion F1 / predicted lesions")
    if args.json:
        from planar3d.io import json_safe, write_json

        write_json(args.json, json_safe(rows))


if __name__ == "__main__":
    main()
