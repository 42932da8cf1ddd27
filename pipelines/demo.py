"""``planar3d demo``: the whole job on a fresh machine, on data the package generates.

Synthetic raw-looking 1 mm 3D FLAIR phantoms (RAS, LPS and LAS orientations) are written,
the planar res-u-net is trained on fold 0's training cases with the ``demo_cpu`` config, the
held-out test cases are predicted in their own geometry, evaluated MSSEG-style, and a report
with QC pictures and the training curves is written. The encoder starts from random weights
(ImageNet weights need a download; pass ``encoder_weights`` to use them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    table: str
    seconds: dict
    dice: Optional[float]


def run_demo(
    out_dir: str | Path = "demo_out",
    cases: int = 14,
    seed: int = 0,
    config: str = "demo_cpu",
    overrides: Sequence[str] = (),
    encoder_weights: Optional[str] = None,
    device: Optional[str] = None,
) -> DemoResult:
    """Generate data, train, predict the held-out cases, evaluate; returns the summary table."""
    from planar3d.data.synth import write_synthetic_dataset
    from planar3d.io import make_folder
    from planar3d.qc import plot_training_curves
    from pipelines.config import load_config
    from pipelines.evaluate import evaluate_folder
    from pipelines.predict import predict_folder
    from pipelines.train import train

    out_dir = make_folder(out_dir)
    seconds = {}
    start = time.perf_counter()
    manifest = out_dir / "data" / "manifest.json"
    if not manifest.is_file():
        # 1 mm 3D heads: lesions of a few voxels (the 3.3 mm "small" grid) cap Dice far below
        # what the method reaches on real resolutions, so the demo pays for 1 mm data.
        write_synthetic_dataset(out_dir / "data", cases=cases, seed=seed, size="full", geometries=("3d",))
    seconds["data"] = time.perf_counter() - start

    start = time.perf_counter()
    train_config = load_config(config, [*overrides, f"seed={seed}"])
    run_dir = out_dir / "train"
    resume = (run_dir / "last.pt").is_file()
    best = train(manifest, 0, run_dir, train_config, resume=resume, overwrite=not resume,
                 device=device, encoder_weights=encoder_weights)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    predict_folder(manifest, out_dir / "predictions", best, fold=0, device=device or "auto", overwrite=True, progress=False)
    seconds["predict"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluation = evaluate_folder(out_dir / "predictions", manifest=manifest, fold=0, out_dir=out_dir / "evaluation")
    plot_training_curves(run_dir / "metrics.csv", out_dir / "evaluation" / "training_curves.png")  # beside the report
    seconds["evaluate"] = time.perf_counter() - start
    dice = (evaluation.overall.get("dice") or {}).get("mean")
    return DemoResult(out_dir, out_dir / "evaluation" / "report.md", evaluation.markdown_summary(), seconds, dice)
