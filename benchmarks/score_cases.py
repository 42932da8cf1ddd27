"""Score a trained model on labeled cases as ``planar3d predict`` would segment them.

Each case goes through ``planar3d predict``'s own steps: :func:`pipelines.predict.load_models`
(one checkpoint, or an ensemble with the members' mean threshold and size), then
:func:`pipelines.predict_steps.prepare_scan` and :func:`pipelines.predict_steps.run_model` (the
window ``predict`` derives from the checkpoint: validation's whole-plane slabs become one
whole-volume pass; until 2026-11-26's fourth session this script used the slabs themselves, and
with instance norm that moved patient26 Dice by 0.001-0.08 across the runs re-scored), and the
one post-processing rule,
:func:`pipelines.predict.lesion_mask` (the checkpoint's threshold, or ``--threshold``; components of <=
``--min-lesion-size`` mm³ removed, default the checkpoint's). Then voxel Dice and the
lesion-wise scores of :mod:`planar3d.metrics` (MSSEG 2016 detection rule). The lesion load is
the lesion volume over the case's brain: its ``brain_masks/`` sidecar when ``planar3d synth``
wrote one, else the non-zero voxels of a brain-extracted image. Cases are "light" below 0.2 %
of the brain and "heavy" from 1 % (issue 9).

Usage:
    python benchmarks/score_cases.py --model RUN/best.pt --manifest M.json [--cases ID,ID] [--min-lesion-size MM3]
    python benchmarks/score_cases.py --model A/best.pt --model B/best.pt --manifest M.json   # an ensemble
    python benchmarks/score_cases.py --model RUN/best.pt --manifest M.json --brain-mask both  # with and without predict --brain-mask
    python benchmarks/score_cases.py --model RUN/best.pt --manifest M.json --brain-mask both --grey-matter-max 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from planar3d.data.synth import HEAVY_LOAD_MIN as HEAVY_MIN, LIGHT_LOAD_MAX as LIGHT_MAX, case_lesion_load


def predicted_case(model, settings, case) -> dict:
    """One labeled case through ``predict``'s steps up to the probability (one model pass):
    ``probability``, ``label`` and ``spacing`` (RAS order), the ``prepared`` scan (its template
    masks when ``settings.brain_mask``) and the lesion ``load``."""
    from pathlib import PurePosixPath

    from planar3d.io import read_volume
    from pipelines.predict_setup import ScanInput
    from pipelines.predict_steps import Ensemble, prepare_scan, run_model

    keep_raw = isinstance(model, Ensemble) and model.needs_raw(settings)
    prepared = prepare_scan(ScanInput(Path(case.image), PurePosixPath(Path(case.image).name)), settings, keep_raw=keep_raw)
    return {"id": case.id, "prepared": prepared, "spacing": prepared.reorientation.spacing,
            "label": prepared.reorientation.forward(read_volume(case.label)[0]) > 0,
            "probability": run_model(model, prepared, settings), "load": case_lesion_load(case.image, case.label)}


def case_row(predicted: dict, settings, threshold: float, with_brain: bool) -> dict:
    """The scores of :func:`predicted_case`'s case masked as ``predict`` would at ``threshold``
    (the settings' size and core rules; with ``with_brain``, its template rules too)."""
    from planar3d.metrics.lesion import lesion_metrics
    from planar3d.metrics.voxel import dice
    from pipelines.predict import lesion_mask

    prepared, label, spacing = predicted["prepared"], predicted["label"], predicted["spacing"]
    mask, _ = lesion_mask(predicted["probability"], threshold, spacing, settings.min_lesion_size, settings.core_threshold,
                          prepared.brain if with_brain else None,
                          prepared.below_grey_matter_max if with_brain else None)
    lesions = lesion_metrics(mask, label, spacing)
    voxel_ppv = float(np.count_nonzero(mask & label)) / max(int(np.count_nonzero(mask)), 1)
    template_rules = None
    if with_brain:
        template_rules = settings.brain_mask + (f", grey matter <= {settings.grey_matter_max:g}"
                                                if settings.grey_matter_max is not None else "")
    return {"case": predicted["id"], "brain_mask": template_rules, "load": predicted["load"], "threshold": float(threshold),
            "dice": float(dice(mask, label)), "voxel_ppv": voxel_ppv,
            **{k: float(lesions[k]) for k in ("lesion_f1", "lesion_ppv", "lesion_sensitivity", "n_ref", "n_pred")}}


def score_case(model, settings, case, brain_masks=(False,)) -> list:
    """One case scored with ``model`` and ``settings`` from :func:`pipelines.predict.load_models`:
    one row for each of ``brain_masks`` (without, with the template rules: ``settings.brain_mask``
    made the mask, ``settings.grey_matter_max`` the grey-matter limit), from one probability map."""
    predicted = predicted_case(model, settings, case)
    return [case_row(predicted, settings, settings.threshold, with_brain) for with_brain in brain_masks]


def check_template_options(parser: argparse.ArgumentParser, brain_mask: str, grey_matter_max) -> None:
    """``--grey-matter-max`` needs the brain mask's template fit and a value in (0, 1), as
    ``predict`` requires: a usage error (exit 2) here instead of a traceback later."""
    from planar3d.brain_mask import check_grey_matter_max

    try:
        check_grey_matter_max(grey_matter_max)
    except ValueError as error:
        parser.error(str(error))
    if grey_matter_max is not None and brain_mask == "none":
        parser.error("--grey-matter-max needs --brain-mask mni152: the grey matter comes from the same registered template")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, action="append",
                        help="a checkpoint; repeated: an ensemble (mean probability, the members' mean threshold and size)")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cases", default="", help="comma-separated case ids (default: every labeled case)")
    parser.add_argument("--min-lesion-size", type=float, default=None, help="mm³ (default: the checkpoint's)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="as predict --threshold (default: the checkpoint's; an ensemble: its members' mean)")
    parser.add_argument("--brain-mask", choices=("none", "mni152", "both"), default="none",
                        help="score as predict --brain-mask does; both: each case without and with it (one model pass)")
    parser.add_argument("--grey-matter-max", type=float, default=None,
                        help="with --brain-mask mni152 or both: score as predict --grey-matter-max does (on the rows with the brain mask)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    check_template_options(parser, args.brain_mask, args.grey_matter_max)

    from planar3d.data.manifest import load_manifest
    from pipelines.predict import load_models

    model, settings, _ = load_models(args.model, "cpu", threshold=args.threshold, min_lesion_size=args.min_lesion_size,
                                     brain_mask=None if args.brain_mask == "none" else "mni152",
                                     grey_matter_max=args.grey_matter_max)
    variants = {"none": (False,), "mni152": (True,), "both": (False, True)}[args.brain_mask]
    wanted = set(filter(None, args.cases.split(",")))
    cases = [c for c in load_manifest(args.manifest).cases if c.label is not None and (not wanted or c.id in wanted)]
    print(f"model {' + '.join(map(str, args.model))} (threshold {settings.threshold:g}, components <= {settings.min_lesion_size:g} mm³ removed), "
          f"{len(cases)} case(s) of {args.manifest}")
    print("| case | brain mask | load % | Dice | lesion F1 | lesion PPV | lesion sens. | voxel PPV | lesions ref/pred |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for case in cases:
        for row in score_case(model, settings, case, variants):
            rows.append(row)
            print(f"| {row['case']} | {row['brain_mask'] or 'none'} | {100 * row['load']:.2f} | {row['dice']:.3f} | "
                  f"{row['lesion_f1']:.3f} | {row['lesion_ppv']:.3f} | {row['lesion_sensitivity']:.3f} | "
                  f"{row['voxel_ppv']:.3f} | {row['n_ref']:.0f}/{row['n_pred']:.0f} |", flush=True)
    for with_brain in variants:
        scored = [r for r in rows if (r["brain_mask"] is not None) == with_brain]
        for name, chosen in (("all", scored), ("light (< 0.2 %)", [r for r in scored if r["load"] < LIGHT_MAX]),
                             ("heavy (>= 1 %)", [r for r in scored if r["load"] >= HEAVY_MIN])):
            if chosen:
                means = {k: float(np.nanmean([r[k] for r in chosen])) for k in ("dice", "lesion_f1", "lesion_ppv")}
                print(f"mean over {name} ({len(chosen)}){', ' + chosen[0]['brain_mask'] if with_brain else ''}: Dice {means['dice']:.3f}, "
                      f"lesion F1 {means['lesion_f1']:.3f}, lesion PPV {means['lesion_ppv']:.3f}")
    if args.json:
        from planar3d.io import json_safe, write_json

        write_json(args.json, json_safe(rows))  # a lesion PPV with no predicted lesion is undefined: null


if __name__ == "__main__":
    main()
