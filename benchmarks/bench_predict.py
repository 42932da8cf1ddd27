"""Benchmark ``planar3d predict`` on the CPU against MONAI DynUNet sliding-window inference.

Prints a Markdown table. Each phase runs in its own subprocess so its peak RSS
(``resource.getrusage``) is its own:

- ``planar``: :func:`pipelines.predict.predict_folder` over the real scans in
  ``../shared/data/real`` (and a few small synthetic ones when :mod:`planar3d.data.synth` exists),
  with a planar res-u-net of ``--width`` (default 1.0 = published widths) and **random weights**
  (speed and memory only; the masks mean nothing), default settings: slabs of 16 whole planes
  along the plane axis, overlap 0.25;
- ``dynunet``: the same scans, same loading/preprocessing/writing, the model step replaced by MONAI
  ``sliding_window_inference`` with ``DynUNet`` in an nnU-Net-like configuration (kernels 3³ x 6,
  strides 1 then 2 x 5, filters 32..320, instance norm), 128³ windows, overlap 0.5, Gaussian;
- ``big``: one synthetic 512x512x200 scan (the real 1 mm head resampled), planar network, to
  show memory stays bounded.

Usage (from the project root)::

    python benchmarks/bench_predict.py                 # full width, a few minutes on 2 cores
    python benchmarks/bench_predict.py --quick         # width 0.25, no DynUNet, small big-scan
    python benchmarks/bench_predict.py --width 0.5 --skip dynunet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL = PROJECT_ROOT.parent / "shared" / "data" / "real"
STEPS = ("load", "preprocess", "model", "postprocess", "write")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _checkpoint(folder: Path, width: float) -> Path:
    import torch

    from planar3d.checkpoint import ModelCheckpoint
    from planar3d.networks import PlanarResUNet, PlanarResUNetConfig

    torch.manual_seed(0)
    config = PlanarResUNetConfig(width=width)
    network = PlanarResUNet(config)
    path = folder / "run" / "best.pt"
    ModelCheckpoint(network.state_dict(), config, training={"note": "random weights (benchmark)"}).save(path)
    return path


def _rows_from_results(results, shapes) -> list:
    rows = []
    for r in results:
        rows.append({"scan": Path(r.input).name, "shape": shapes.get(r.input), "status": r.status,
                     "error": r.error, **{s: r.timings.get(s, 0.0) for s in STEPS}})
    return rows


def _shape(path) -> list:
    import nibabel as nib

    return list(nib.load(str(path)).shape)


def phase_planar(inputs: Path, work: Path, width: float) -> dict:
    from pipelines.predict import predict_folder

    model = _checkpoint(work, width)
    shapes = {str(p): _shape(p) for p in inputs.rglob("*.nii*")}
    start = time.perf_counter()
    summary = predict_folder(inputs, work / "out_planar", model, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    return {"wall": wall, "rows": _rows_from_results(summary.results, shapes), "rss": peak_rss_mib(),
            "settings": {"roi_size": summary.settings["roi_size"], "overlap": summary.settings["overlap"]}}


def phase_dynunet(inputs: Path, work: Path) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DynUNet

    from planar3d.checkpoint import ModelCheckpoint
    from planar3d.networks import PlanarResUNetConfig
    from pipelines.predict import InferenceSettings, OutputPaths, find_inputs, finish_scan, prepare_scan

    torch.manual_seed(0)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 5
    net = DynUNet(3, 1, 1, kernel_size=[[3, 3, 3]] * 6, strides=strides, upsample_kernel_size=strides[1:],
                  filters=[32, 64, 128, 256, 320, 320], norm_name="instance").eval()
    settings = InferenceSettings.from_checkpoint(ModelCheckpoint({}, PlanarResUNetConfig()))
    rows = []
    start = time.perf_counter()
    for scan in find_inputs(inputs):
        prepared = prepare_scan(scan, settings)
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.from_numpy(prepared.volume)[None, None]
            logits = sliding_window_inference(x, (128, 128, 128), 1, net, overlap=0.5, mode="gaussian")
            probability = torch.sigmoid(logits)[0, 0].numpy()
        prepared.timings["model"] = time.perf_counter() - t
        outputs = OutputPaths.of(work / "out_dynunet", scan.relative)
        finish_scan(prepared, probability, outputs, settings)
        rows.append({"scan": scan.path.name, "shape": _shape(scan.path), "status": "done", "error": None,
                     **{s: prepared.timings[s] for s in STEPS}})
    return {"wall": time.perf_counter() - start, "rows": rows, "rss": peak_rss_mib(),
            "settings": {"roi_size": [128, 128, 128], "overlap": 0.5}}


def make_big(path: Path, shape=(512, 512, 200)) -> None:
    """The real 1 mm head resampled (linear) to ``shape`` with the field of view kept."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    source = nib.load(str(REAL / "flair_head_1mm.nii.gz"))
    data = np.asarray(source.dataobj, dtype=np.float32)
    factors = [t / s for t, s in zip(shape, data.shape)]
    big = ndimage.zoom(data, factors, order=1).astype(np.int16)
    affine = source.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([1 / f for f in factors])
    nib.save(nib.Nifti1Image(big, affine), str(path))


def run_phase(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.phase == "planar":
        result = phase_planar(Path(args.inputs), work, args.width)
    elif args.phase == "dynunet":
        result = phase_dynunet(Path(args.inputs), work)
    else:
        raise SystemExit(f"unknown phase {args.phase}")
    print("RESULT " + json.dumps(result))


def _subprocess(phase: str, inputs: Path, work: Path, width: float) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--inputs", str(inputs), "--work", str(work), "--width", str(width)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"phase {phase} failed:\n{completed.stderr[-3000:]}")


def table(name: str, result: dict) -> str:
    lines = [f"### {name}: roi {result['settings']['roi_size']}, overlap {result['settings']['overlap']}", "",
             "| scan | shape | load s | preprocess s | model s | postprocess s | write s | total s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row["status"] != "done":
            lines.append(f"| {row['scan']} | {row['shape']} | {row['status']}: {row['error']} |||||")
            continue
        total = sum(row[s] for s in STEPS)
        lines.append(f"| {row['scan']} | {'x'.join(map(str, row['shape']))} | "
                     + " | ".join(f"{row[s]:.2f}" for s in STEPS) + f" | {total:.1f} |")
    done = [r for r in result["rows"] if r["status"] == "done"]
    steps = {s: sum(r[s] for r in done) for s in STEPS}
    other = steps["load"] + steps["preprocess"] + steps["postprocess"] + steps["write"]
    lines += ["", f"{len(done)} scans in {result['wall']:.1f} s wall: {60 * len(done) / result['wall']:.2f} scans/min; "
              f"model {steps['model']:.1f} s, I/O + pre/post {other:.1f} s = {100 * other / result['wall']:.1f} % of wall "
              f"({100 * other / max(sum(steps.values()), 1e-9):.1f} % of summed step time); peak RSS {result['rss']:.0f} MiB", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=None, help="planar network width (default 1.0; 0.25 with --quick)")
    parser.add_argument("--quick", action="store_true", help="width 0.25, no DynUNet, 256x256x100 big scan")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: planar, dynunet, big")
    parser.add_argument("--synthetic", type=int, default=2, help="small synthetic scans added to the real ones")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.width is None:
        args.width = 0.25 if args.quick else 1.0
    if args.phase:
        run_phase(args)
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()} | ({"dynunet"} if args.quick else set())
    import torch

    print(f"# bench_predict {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), planar width {args.width}, random weights\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = Path(tmp)
        inputs = work / "inputs"
        inputs.mkdir()
        for scan in sorted(REAL.glob("*.nii.gz")):
            (inputs / scan.name).symlink_to(scan)
        if args.synthetic:
            try:
                from planar3d.data.synth import write_synthetic_dataset
            except ImportError:
                pass
            else:
                manifest = write_synthetic_dataset(work / "synth", args.synthetic, seed=0, size="small")
                for image in sorted((manifest.parent / "images").glob("*.nii*")):
                    (inputs / f"synth_{image.name}").symlink_to(image)
        if "planar" not in skip:
            print(table(f"planar res-u-net width {args.width} (planar3d predict)", _subprocess("planar", inputs, work, args.width)), flush=True)
        if "dynunet" not in skip:
            print(table("MONAI DynUNet nnU-Net-like, 128³ windows, overlap 0.5, Gaussian", _subprocess("dynunet", inputs, work, args.width)), flush=True)
        if "big" not in skip:
            big = work / "big"
            big.mkdir()
            shape = (256, 256, 100) if args.quick else (512, 512, 200)
            make_big(big / "big_512x512x200.nii.gz" if not args.quick else big / "big.nii.gz", shape)
            print(table(f"synthetic {'x'.join(map(str, shape))} scan, planar width {args.width}", _subprocess("planar", big, work / "bigwork", args.width)), flush=True)


if __name__ == "__main__":
    main()
