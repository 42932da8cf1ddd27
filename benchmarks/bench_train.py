"""Training benchmark on synthetic phantoms: held-out Dice against wall time, and throughput.

Writes a small synthetic data set (``planar3d synth`` phantoms), trains fold 0 with a config
(default: the packaged ``demo_cpu``) in chunks of epochs (resuming exactly between chunks), and
after each chunk predicts the fold's held-out test cases with ``last.pt`` to report their Dice.

With ``--host`` it also injects real lesion masks into a real FLAIR (``planar3d synth --host``),
trains on both, and its held-out cases are those of fold 0 of the merged manifest.

Usage:
    python benchmarks/bench_train.py [--cases 14] [--chunk 30] [--config demo_cpu] [KEY=VALUE ...]
    python benchmarks/bench_train.py --brain-extracted 0.5 --host FLAIR --lesion-masks DIR --template IMAGE \
        --also-test data_manifests/mslub_mni_patient26.json [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path


def test_dice(checkpoint_path: Path, cases) -> float:
    """Mean Dice of a checkpoint on cases, post-processed as ``planar3d predict`` does by default
    (its stored threshold, whole-volume inference, components of <= 3 mm³ removed)."""
    from planar3d.checkpoint import load_model
    from planar3d.inference import predict_probabilities
    from planar3d.metrics.voxel import dice
    from planar3d.preprocess import load_preprocessed
    from pipelines.predict import lesion_mask

    model, checkpoint = load_model(checkpoint_path)
    scores = []
    for case in cases:
        scan = load_preprocessed(case.image, checkpoint.normalization, label=case.label)
        probability = predict_probabilities(model, scan.volume, roi_size=checkpoint.roi_size, overlap=checkpoint.overlap,
                                            in_channels=checkpoint.network.in_channels)
        mask, _ = lesion_mask(probability, checkpoint.threshold, scan.reorientation.spacing, 3.0)
        scores.append(dice(mask, scan.label))
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=30, help="epochs between test evaluations")
    parser.add_argument("--config", default="demo_cpu")
    parser.add_argument("--geometry", default="3d", help="synthetic geometries, e.g. 3d,thick")
    parser.add_argument("--size", default="full", help="synthetic size preset: full (1 mm) or small (3.3 mm)")
    parser.add_argument("--also-test", default=None,
                        help="manifest of other labeled cases (e.g. data_manifests/mslub_mni_patient26.json) scored with best.pt")
    parser.add_argument("--work", default=None, help="folder for data and run (default: a temp folder)")
    parser.add_argument("--manifest", default=None, help="use this manifest instead of synthetic data")
    parser.add_argument("--brain-extracted", type=float, default=0.0, help="fraction of skull-stripped cases (synth --brain-extracted)")
    parser.add_argument("--host", default=None, help="also inject lesions into this real FLAIR (synth --host) and train on both")
    parser.add_argument("--lesion-masks", default=None, help="with --host: folder of lesion masks")
    parser.add_argument("--template", default=None, help="with --host: brain-extracted image in the masks' space (synth --template)")
    parser.add_argument("--host-cases", type=int, default=12, help="with --host: injected cases (seed --seed + 1)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from planar3d.data.manifest import load_manifest, merge_manifests, save_manifest
    from planar3d.data.synth import write_synthetic_dataset
    from pipelines.config import load_config
    from pipelines.train import train

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    if args.manifest:
        manifest_path = Path(args.manifest)
    elif args.host is None:
        manifest_path = write_synthetic_dataset(work / "data", args.cases, args.seed, size=args.size,
                                                geometries=tuple(args.geometry.split(",")),
                                                brain_extracted=args.brain_extracted)
    else:
        # Phantoms plus lesions injected into a real scan: "planar3d synth" twice, then "manifest merge".
        phantoms = write_synthetic_dataset(work / "data" / "phantoms", args.cases, args.seed, size=args.size,
                                           geometries=tuple(args.geometry.split(",")), brain_extracted=args.brain_extracted)
        injected = write_synthetic_dataset(work / "data" / "injected", args.host_cases, args.seed + 1, host=args.host,
                                           lesion_masks_dir=args.lesion_masks, template=args.template,
                                           brain_extracted=args.brain_extracted)
        manifest_path = work / "data" / "merged.json"
        save_manifest(merge_manifests([load_manifest(phantoms), load_manifest(injected)], "transfer"), manifest_path)
    config = load_config(args.config, args.overrides)
    test_cases = load_manifest(manifest_path).test_cases(0)
    run = work / "run"
    rows, wall, done = [], 0.0, 0
    while done < config.optim.epochs:
        start = time.perf_counter()  # training time only: the test evaluations are not counted
        train(manifest_path, 0, run, config, resume=done > 0, device="cpu", max_epochs_this_run=args.chunk)
        wall += time.perf_counter() - start
        done = min(config.optim.epochs, done + args.chunk)
        score = test_dice(run / "last.pt", test_cases)
        with open(run / "metrics.csv") as stream:
            last = list(csv.DictReader(stream))[-1]
        rows.append((done, wall, float(last["val_dice"]), score, float(last["voxels_per_second"])))
        print(f"epoch {done}: wall {wall:.0f} s, test Dice {score:.3f}", flush=True)
    best = test_dice(run / "best.pt", test_cases)
    print(f"\nconfig {args.config} {' '.join(args.overrides)}; {args.cases} synthetic cases ({args.size}, {args.geometry}), "
          f"fold 0: {len(test_cases)} test cases; run folder {run}")
    print("| epochs | wall s | val Dice (last) | test Dice (last.pt) | train voxels/s |")
    print("|---|---|---|---|---|")
    for epochs, wall, val, score, speed in rows:
        print(f"| {epochs} | {wall:.0f} | {val:.3f} | {score:.3f} | {speed:.3g} |")
    print(f"\nbest.pt: test Dice {best:.3f}")
    if args.also_test:
        other = [case for case in load_manifest(args.also_test).cases if case.label is not None]
        print(f"best.pt on {args.also_test} ({', '.join(c.id for c in other)}): Dice {test_dice(run / 'best.pt', other):.3f}")


if __name__ == "__main__":
    main()
