"""Choose an ensemble's threshold on labeled cases that none of its members trained on.

``predict --model A B C`` averages the members' probabilities and cuts the mean at the mean of
the members' thresholds (:func:`planar3d.ensemble.ensemble_threshold`). Each of those was chosen
on the member's own validation cases: injected lesions on a host left out of that member's
training. On the cpu recipe's ensembles that cut was too high for a scan from another host: the
mean of several models is less confident at a lesion's edge than each model, so the mask shrank,
fragments of one lesion counted as several, and real confluent lesions were under-segmented
(docs/training.md, "Issue 9, sixteenth session").

This script scores a grid of thresholds on the cases of one or more groups, each group an
ensemble and a manifest of cases from a host none of its members trained on (e.g. a
leave-one-host-out build's ``test_manifest.json``), through ``predict``'s own steps
(:func:`score_cases.predicted_case`, one model pass a case). It prints, per threshold, the means
over all cases of all groups, and the threshold with the best mean lesion-wise F1 (the criterion
validation uses; ties: the lower threshold). Use it with ``planar3d predict --threshold T``; the
figures at that threshold are then tuning figures, not a test.

Usage:
    python benchmarks/ensemble_threshold.py \\
        --group LEFT_OUT_1/test_manifest.json A/best.pt B/best.pt C/best.pt \\
        --group LEFT_OUT_2/test_manifest.json D/best.pt E/best.pt F/best.pt \\
        [--brain-mask mni152 --grey-matter-max 0.5] [--grid 0.1,0.2,...,0.9] [--json rows.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_cases import LIGHT_MAX, case_row, check_template_options, predicted_case  # noqa: E402

GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))


def threshold_means(rows: Sequence[Dict], thresholds: Sequence[float]) -> List[Dict]:
    """Per threshold, the mean Dice, lesion F1 and lesion PPV over ``rows`` (one per case and
    threshold, :func:`score_cases.case_row`), and the mean lesion PPV of the light cases; a PPV
    with no predicted lesion is undefined and left out of its mean (NaN when all are).

    Example:
        >>> rows = [{"threshold": 0.3, "dice": 0.5, "lesion_f1": 0.4, "lesion_ppv": 0.5, "load": 0.001},
        ...         {"threshold": 0.3, "dice": 0.7, "lesion_f1": 0.6, "lesion_ppv": float("nan"), "load": 0.02}]
        >>> threshold_means(rows, [0.3])[0]["lesion_f1"], threshold_means(rows, [0.3])[0]["lesion_ppv"]
        (0.5, 0.5)
    """
    table = []
    for threshold in thresholds:
        at = [r for r in rows if r["threshold"] == threshold]
        light = [r["lesion_ppv"] for r in at if r["load"] < LIGHT_MAX]

        def mean(values):
            values = [v for v in values if not np.isnan(v)]
            return float(np.mean(values)) if values else float("nan")

        table.append({"threshold": threshold, "cases": len(at), "dice": mean([r["dice"] for r in at]),
                      "lesion_f1": mean([r["lesion_f1"] for r in at]), "lesion_ppv": mean([r["lesion_ppv"] for r in at]),
                      "light_lesion_ppv": mean(light)})
    return table


def best_threshold(table: Sequence[Dict]) -> float:
    """The threshold of :func:`threshold_means`' table with the highest mean lesion F1; ties
    (to 1e-9) go to the lower threshold, which keeps more of a lesion.

    Example:
        >>> best_threshold([{"threshold": 0.2, "lesion_f1": 0.5}, {"threshold": 0.4, "lesion_f1": 0.5},
        ...                 {"threshold": 0.6, "lesion_f1": 0.4}])
        0.2
    """
    scored = [row for row in table if not np.isnan(row["lesion_f1"])]
    if not scored:
        raise ValueError("no threshold has a defined lesion F1: no labeled case was scored")
    top = max(row["lesion_f1"] for row in scored)
    return min(row["threshold"] for row in scored if row["lesion_f1"] >= top - 1e-9)


def parse_grid(text: str) -> List[float]:
    """``"0.1,0.3"`` -> ``[0.1, 0.3]``; every value in (0, 1).

    Raises:
        SystemExit: an empty grid, a value that is not a number or not in (0, 1).
    """
    try:
        grid = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--grid must be comma-separated numbers in (0, 1), got {text!r}") from None
    if not grid or not all(0.0 < t < 1.0 for t in grid):
        raise SystemExit(f"--grid must be comma-separated numbers in (0, 1), got {text!r}")
    return grid


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar="MANIFEST MODEL",
                        help="a manifest of labeled cases, then the checkpoints of an ensemble none of which trained on them")
    parser.add_argument("--grid", default=",".join(map(str, GRID)), help="thresholds to score (default 0.1-0.9 by 0.1)")
    parser.add_argument("--brain-mask", choices=("none", "mni152"), default="none", help="as predict --brain-mask")
    parser.add_argument("--grey-matter-max", type=float, default=None, help="as predict --grey-matter-max")
    parser.add_argument("--json", type=Path, default=None, help="also write every case's row at every threshold here")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)
    if any(len(group) < 2 for group in args.group):
        parser.error("each --group needs a manifest and at least one model")
    check_template_options(parser, args.brain_mask, args.grey_matter_max)

    from planar3d.data.manifest import load_manifest
    from pipelines.predict import load_models

    rows: List[Dict] = []
    for manifest, *models in args.group:
        model, settings, _ = load_models([Path(m) for m in models], "cpu", brain_mask=None if args.brain_mask == "none" else "mni152",
                                         grey_matter_max=args.grey_matter_max)
        cases = [c for c in load_manifest(Path(manifest)).cases if c.label is not None]
        print(f"group {manifest}: {len(models)} model(s), their threshold {settings.threshold:g}, {len(cases)} labeled case(s)", flush=True)
        for case in cases:
            predicted = predicted_case(model, settings, case)
            # case ids may repeat across manifests: each row names its group
            rows += [{"group": manifest, **case_row(predicted, settings, t, args.brain_mask != "none")} for t in grid]
    table = threshold_means(rows, grid)
    print("| threshold | cases | Dice | lesion F1 | lesion PPV | light-case lesion PPV |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['threshold']:g} | {row['cases']} | {row['dice']:.3f} | {row['lesion_f1']:.3f} | {row['lesion_ppv']:.3f} | "
              f"{row['light_lesion_ppv']:.3f} |")
    chosen = best_threshold(table)
    print(f"best mean lesion F1 at threshold {chosen:g}: planar3d predict ... --threshold {chosen:g}")
    if args.json:
        from planar3d.io import json_safe, write_json

        write_json(args.json, json_safe(rows))
    return chosen


if __name__ == "__main__":
    main()
