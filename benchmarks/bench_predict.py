"""Benchmark ``planar3d predict`` on the CPU against MONAI DynUNet sliding-window inference.

Prints a Markdown table. Each phase runs in its own subprocess so its peak RSS
(``resource.getrusage``) is its own:

- ``planar``: :func:`pipelines.predict.predict_folder` over the real scans in
  ``../shared/data/real`` (and a few small synthetic ones when :mod:`planar3d.data.synth` exists),
  with a planar res-u-net of ``--width`` (default 1.0 = published widths) and **random weights**
  (speed and memory only; the masks mean nothing), default settings: one whole-volume pass (slabs along the plane axis when memory requires)
  along the plane axis, overlap 0.25;
- ``dynunet``: the same scans, same loading/preprocessing/writing, the model step replaced by MONAI
  ``sliding_window_inference`` with ``DynUNet`` in an nnU-Net-like configuration (kernels 3³ x 6,
  strides 1 then 2 x 5, filters 32..320, instance norm), 128³ windows, overlap 0.5, Gaussian;
- ``unet``: the same with MONAI ``UNet`` (16..256, 2 residual units), 96³ windows, overlap 0.25;
- ``big``: one synthetic 512x512x200 scan (the real 1 mm head resampled), planar network, to
  show memory stays bounded.

Usage (from the project root)::

    python benchmarks/bench_predict.py                 # full width, a few minutes on 2 cores
    python benchmarks/bench_predict.py --quick         # width 0.25, no DynUNet, small big-scan
    python benchmarks/bench_predict.py --width 0.5 --skip dynunet
    python benchmarks/bench_predict.py --head          # issue 10's CPU rows on the 1 mm head, one table
    python benchmarks/bench_predict.py --head --bf16   # the same plus planar3d and DynUNet under bf16 autocast
    python benchmarks/bench_predict.py --head --copies 2   # the scan twice in the folder: first and steady scan
    python benchmarks/bench_predict.py --head --network default   # the default config's network (instance norm)

Memory: ``planar3d predict`` on the CPU asks for transparent huge pages when it predicts one scan
with one model and keeps freed memory in the process for a folder or an ensemble
(:func:`pipelines.predict.cpu_memory_policy`, :mod:`planar3d.host_memory`). ``--head`` therefore
also runs planar3d under each policy (``planar+retain``: freed memory kept; ``planar+huge-pages``:
transparent huge pages, memory given back; ``planar+default``: the allocator as it is) and
DynUNet with freed memory kept (``dynunet+retain``), and compares planar3d with DynUNet both as a
MONAI script runs it and under the same allocator setting.
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

import numpy as np
from bench_model import PLANAR_NETWORKS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL = PROJECT_ROOT.parent / "shared" / "data" / "real"
STEPS = ("load", "preprocess", "model", "postprocess", "write")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _checkpoint(folder: Path, width: float, network: str = "published") -> Path:
    import torch

    from bench_model import planar_network_config
    from planar3d.checkpoint import ModelCheckpoint
    from planar3d.networks import PlanarResUNet

    torch.manual_seed(0)
    # plane axis 2: predict's slabs and the checkpoints train writes for axial-slice scans
    config = planar_network_config(network, width, plane_axis=2)
    model = PlanarResUNet(config)
    path = folder / "run" / "best.pt"
    ModelCheckpoint(model.state_dict(), config, training={"note": "random weights (benchmark)"}).save(path)
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


def _planar_work(checkpoint_path: Path, scan_path: str):
    """FLOPs and slab plan of ``planar3d predict`` on one scan (the plan as it would be now)."""
    from planar3d.checkpoint import load_model
    from planar3d.inference import estimated_forward_bytes, memory_budget_bytes, plan_slabs, size_multiple
    from planar3d.preprocess import Reorientation

    model, _ = load_model(checkpoint_path)
    import nibabel as nib

    image = nib.load(scan_path)
    shape = list(Reorientation.of_image(image).forward(np.zeros(image.shape, np.uint8)).shape)
    axis = model.config.plane_axis
    multiple = size_multiple(model)
    per_plane = estimated_forward_bytes(model, shape, "cpu") // shape[axis]
    slabs = plan_slabs(shape[axis], max(memory_budget_bytes("cpu") // per_plane, 1), 16, multiple[axis])
    flops = 0.0
    for slab in slabs:
        slab_shape = list(shape)
        slab_shape[axis] = slab.stop - slab.start
        flops += forward_flops(model, [s + (-s) % m for s, m in zip(slab_shape, multiple)])
    plan = "whole volume, 1 pass" if len(slabs) == 1 else f"{len(slabs)} slabs, margin 16"
    return flops, plan


def phase_planar(inputs: Path, work: Path, width: float, precision: str = "fp32", network: str = "published") -> dict:
    from pipelines.predict import predict_folder

    model = _checkpoint(work, width, network)
    shapes = {str(p): _shape(p) for p in inputs.rglob("*.nii*")}
    start = time.perf_counter()
    summary = predict_folder(inputs, work / "out_planar", model, overwrite=True, progress=False, precision=precision)
    wall = time.perf_counter() - start
    rows = _rows_from_results(summary.results, shapes)
    for row, result in zip(rows, summary.results):
        row["flops"], row["plan"] = _planar_work(model, result.input)
    return {"wall": wall, "rows": rows, "rss": peak_rss_mib(),
            "settings": {"roi_size": summary.settings["roi_size"], "overlap": summary.settings["overlap"]}}


#: MONAI peers: network builder, window, overlap (MEASUREMENTS.md's settings).
PEERS = {
    "dynunet": ((128, 128, 128), 0.5),  # nnU-Net-like, Gaussian blending
    "unet": ((96, 96, 96), 0.25),
}


def build_peer(name: str):
    import torch

    torch.manual_seed(0)
    if name == "dynunet":
        from monai.networks.nets import DynUNet

        strides = [[1, 1, 1]] + [[2, 2, 2]] * 5
        return DynUNet(3, 1, 1, kernel_size=[[3, 3, 3]] * 6, strides=strides, upsample_kernel_size=strides[1:],
                       filters=[32, 64, 128, 256, 320, 320], norm_name="instance").eval()
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2).eval()


def window_count(shape, window, overlap) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs (its scan interval rule)."""
    import math

    count = 1
    for size, roi in zip(shape, window):
        roi = min(roi, size)
        interval = max(int(roi * (1 - overlap)), 1)
        count *= 1 if size <= roi else math.ceil((size - roi) / interval) + 1
    return count


def forward_flops(model, shape) -> float:
    """Convolution/matmul FLOPs of one forward pass over ``shape`` (FlopCounterMode, meta device)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.zeros((1, 1, *shape), device="meta"))
    return float(counter.get_total_flops())


def phase_peer(name: str, inputs: Path, work: Path, precision: str = "fp32") -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from planar3d.inference import precision_context

    from planar3d.checkpoint import ModelCheckpoint
    from planar3d.networks import PlanarResUNetConfig
    from pipelines.predict import InferenceSettings, OutputPaths, find_inputs, finish_scan, prepare_scan

    net = build_peer(name)
    window, overlap = PEERS[name]
    settings = InferenceSettings.from_checkpoint(ModelCheckpoint({}, PlanarResUNetConfig()))
    rows = []
    start = time.perf_counter()
    for scan in find_inputs(inputs):
        prepared = prepare_scan(scan, settings)
        t = time.perf_counter()
        with torch.inference_mode(), precision_context("cpu", precision):
            x = torch.from_numpy(prepared.volume)[None, None]
            logits = sliding_window_inference(x, window, 1, net, overlap=overlap, mode="gaussian").float()
            probability = torch.sigmoid(logits)[0, 0].numpy()
        prepared.timings["model"] = time.perf_counter() - t
        shape = list(prepared.volume.shape)
        outputs = OutputPaths.of(work / f"out_{name}", scan.relative)
        finish_scan(prepared, probability, outputs, settings)
        passes = window_count(shape, window, overlap)
        rows.append({"scan": scan.path.name, "shape": _shape(scan.path), "status": "done", "error": None,
                     "flops": passes * forward_flops(net, [min(w, s) for w, s in zip(window, shape)]),
                     "plan": f"{passes} windows {'x'.join(map(str, window))}, overlap {overlap}",
                     **{s: prepared.timings[s] for s in STEPS}})
    return {"wall": time.perf_counter() - start, "rows": rows, "rss": peak_rss_mib(),
            "settings": {"roi_size": list(window), "overlap": overlap}}


def phase_dynunet(inputs: Path, work: Path) -> dict:
    return phase_peer("dynunet", inputs, work)


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
    phase, _, precision = args.phase.partition("@")  # "planar@bf16": that phase in bf16
    precision = precision or "fp32"
    phase, _, memory = phase.partition("+")  # "dynunet+huge-pages", "planar+retain": host allocator
    from planar3d.host_memory import ENVIRONMENT_VARIABLE, POLICIES, configure_host_memory

    if memory and memory not in POLICIES:
        raise SystemExit(f"unknown memory setting in phase {args.phase}")
    if memory:
        os.environ[ENVIRONMENT_VARIABLE] = memory  # what PLANAR3D_HOST_MEMORY=... does for a user
    if phase == "planar" or memory:
        # before the random checkpoint is built: PyTorch reads its huge-page switch once, at its
        # first large allocation, and planar3d predict makes none before it sets the policy
        from pipelines.predict import cpu_memory_policy

        configure_host_memory(cpu_memory_policy(len(list(Path(args.inputs).glob("*.nii*")))))
    if phase == "planar":
        result = phase_planar(Path(args.inputs), work, args.width, precision, args.network)
    elif phase in PEERS:
        result = phase_peer(phase, Path(args.inputs), work, precision)
    else:
        raise SystemExit(f"unknown phase {args.phase}")
    print("RESULT " + json.dumps(result))


def _subprocess(phase: str, inputs: Path, work: Path, width: float, network: str = "published") -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--inputs", str(inputs), "--work", str(work), "--width", str(width),
               "--network", network]
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


def gemm_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 GEMM rate the model rows are compared to (:func:`bench_model.matmul_peak`: the
    better of MKL's and oneDNN's n x n x n product)."""
    import torch

    from bench_model import matmul_peak

    return matmul_peak(torch.device("cpu"), torch.float32, n, repeats)


def head_rows(scan: Path, width: float, bf16: bool = False, copies: int = 1, network: str = "published") -> None:
    """Issue 10's CPU rows: ours vs DynUNet vs MONAI UNet on one scan, same run, one table (with
    ``bf16``, also ours and DynUNet under bf16 autocast, each compared with DynUNet in its precision).

    Each model runs over a folder holding ``copies`` links to the scan; rows report the first
    scan (a fresh process) and, with copies > 1, the last (steady state of a folder)."""
    gemm_start = gemm_flops_per_s()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_predict_head_") as tmp:
        work = Path(tmp)
        inputs = work / "inputs"
        inputs.mkdir()
        stem = scan.name[: -len(".nii.gz")] if scan.name.endswith(".nii.gz") else scan.stem
        for copy in range(copies):
            (inputs / f"{stem}_copy{copy}.nii.gz").symlink_to(scan.resolve())
        results = {}
        phases = ("planar", "planar+retain", "planar+huge-pages", "planar+default", "dynunet", "dynunet+retain", "unet")
        for phase in phases + (("planar@bf16", "dynunet@bf16") if bf16 else ()):
            results[phase] = _subprocess(phase, inputs, work / phase, width, network)
            times = ", ".join(f"{r['model']:.1f}" for r in results[phase]["rows"])
            print(f"  {phase}: model {times} s ({results[phase]['rows'][0].get('plan')})", file=sys.stderr, flush=True)
    gemm_end = gemm_flops_per_s()
    gemm = max(gemm_start, gemm_end)
    ours = f"planar res-u-net ({network} network) width {width}"
    names = {"planar": f"{ours} (planar3d predict's memory policy: huge pages for one scan, freed memory kept for a folder)",
             "planar+retain": f"{ours}, PLANAR3D_HOST_MEMORY=retain (freed memory kept)",
             "planar+huge-pages": f"{ours}, PLANAR3D_HOST_MEMORY=huge-pages",
             "planar+default": f"{ours}, PLANAR3D_HOST_MEMORY=default (glibc default)",
             "dynunet": "MONAI DynUNet, nnU-Net-like (31 M), glibc default (as a MONAI script runs)",
             "dynunet+retain": "MONAI DynUNet, nnU-Net-like (31 M), freed memory kept (planar3d's policy for a folder)",
             "unet": "MONAI UNet (4.8 M)",
             "planar@bf16": f"{ours} (planar3d predict --precision bf16)",
             "dynunet@bf16": "MONAI DynUNet, nnU-Net-like (31 M), bf16 autocast"}
    print(f"scan {scan.name} {'x'.join(map(str, results['planar']['rows'][0]['shape']))}, {copies} cop{'y' if copies == 1 else 'ies'} "
          f"in the folder; fp32 2048² GEMM "
          f"{gemm_start / 1e9:.0f} GFLOP/s at the start, {gemm_end / 1e9:.0f} at the end (the higher is the reference); "
          f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| model | scan | passes | GFLOP | model s | scan total s | GFLOP/s | % of GEMM rate "
          "| model time vs DynUNet (glibc default) | vs DynUNet (memory retained) | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    indices = sorted({0, copies - 1})
    for phase, result in results.items():
        for index in indices:
            row = result["rows"][index]
            which = "first" if index == 0 else "last"
            if row["status"] != "done":
                print(f"| {names[phase]} | {which} | {row['status']}: {row['error']} |||||||||")
                continue
            rate = row["flops"] / row["model"]
            if phase.endswith("@bf16"):  # compared in the same precision
                peers = ["dynunet@bf16", None]
            else:
                peers = ["dynunet", "dynunet+retain"]
            versus = []
            for peer in peers:
                if peer is None:
                    versus.append("")
                    continue
                reference = results[peer]["rows"][index]["model"]
                versus.append("reference" if phase == peer else f"{reference / row['model']:.2f}x faster")
            print(f"| {names[phase]} | {which} | {row['plan']} | {row['flops'] / 1e9:.0f} | {row['model']:.1f} | "
                  f"{sum(row[s] for s in STEPS):.1f} | {rate / 1e9:.0f} | {100 * rate / gemm:.0f} % | "
                  f"{versus[0]} | {versus[1]} | {result['rss'] / 1024:.1f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=None, help="planar network width (default 1.0; 0.25 with --quick)")
    parser.add_argument("--quick", action="store_true", help="width 0.25, no DynUNet, 256x256x100 big scan")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: planar, dynunet, big")
    parser.add_argument("--synthetic", type=int, default=2, help="small synthetic scans added to the real ones")
    parser.add_argument("--head", action="store_true",
                        help="only the CPU rows of one scan (--scan): planar3d predict vs DynUNet vs MONAI UNet, one table")
    parser.add_argument("--scan", default=str(REAL / "flair_head_1mm.nii.gz"), help="the scan of --head")
    parser.add_argument("--bf16", action="store_true", help="with --head: also planar3d and DynUNet in bf16 (CPU autocast)")
    parser.add_argument("--copies", type=int, default=1,
                        help="with --head: links to the scan in the folder (2: also the steady state after the first scan)")
    parser.add_argument("--network", choices=PLANAR_NETWORKS, default="published",
                        help="planar3d's network: the published one (no norm) or the packaged default config's "
                             "(instance norm: what train gives without flags)")
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

    if args.head:
        print(f"# bench_predict --head {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), random weights\n", flush=True)
        head_rows(Path(args.scan), args.width, args.bf16, max(1, args.copies), args.network)
        return

    print(f"# bench_predict {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), planar width {args.width}, {args.network} network, random weights\n", flush=True)
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
            print(table(f"planar res-u-net ({args.network} network) width {args.width} (planar3d predict)", _subprocess("planar", inputs, work, args.width, args.network)), flush=True)
        if "dynunet" not in skip:
            print(table("MONAI DynUNet nnU-Net-like, 128³ windows, overlap 0.5, Gaussian", _subprocess("dynunet", inputs, work, args.width)), flush=True)
        if "big" not in skip:
            big = work / "big"
            big.mkdir()
            shape = (256, 256, 100) if args.quick else (512, 512, 200)
            make_big(big / "big_512x512x200.nii.gz" if not args.quick else big / "big.nii.gz", shape)
            print(table(f"synthetic {'x'.join(map(str, shape))} scan, planar width {args.width}", _subprocess("planar", big, work / "bigwork", args.width, args.network)), flush=True)


if __name__ == "__main__":
    main()
