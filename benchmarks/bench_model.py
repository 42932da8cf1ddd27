"""Speed, FLOPs and peak memory of the full-width planar res-u-net against MONAI peers.

One run measures, on the current device (CUDA if available, else the CPU):

* a matrix-multiply peak (fp32 on the CPU; fp32 and bf16 on CUDA), best of several;
* for each model (planar res-u-net width 1.0, MONAI DynUNet nnU-Net-like, MONAI UNet):
  - a training slab 1x1x16x256x256: forward (under ``torch.inference_mode()``) and
    forward+backward (loss = mean of the outputs, no optimiser step);
  - a whole-head volume 1x1x176x256x256: forward under ``torch.inference_mode()``;
  time (median of the timed repeats after warm-up), FLOPs (``FlopCounterMode``), GFLOP/s,
  % of the matmul peak and peak memory.

All cases run in this one process (a GPU run of every row takes a few minutes, not a process
start per case); peak memory is still each case's own: ``torch.cuda.max_memory_allocated`` after
a reset on CUDA, the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU.
``--isolate`` runs every case in a fresh process instead. Variants: ``fp32`` (NCDHW), ``cl``
(fp32 ``channels_last_3d``, how ``planar3d predict`` runs on the CPU), ``bf16-cl`` (bf16 autocast +
``channels_last_3d``, CUDA) and ``bf16-cl+compile`` (the same under ``torch.compile``).

The planar net is built with ``plane_axis=0``: input (N, C, planes, H, W) with (1,3,3) kernels,
the 16 slab planes along the first spatial axis. DynUNet needs every spatial size divisible by
32 (five stride-2 levels), so its input is zero-padded at the far end up to a multiple of 32
(16 -> 32 planes for the slab, 176 -> 192 for the whole head) inside the timed region and the
output cropped back; the table shows the padded size.

Usage::

    python benchmarks/bench_model.py                      # full run (CPU: ~10 minutes)
    python benchmarks/bench_model.py --quick              # smoke run on small inputs
    python benchmarks/bench_model.py --models planar,unet --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# run as a script only benchmarks/ is on the path; planar3d and pipelines come from the source tree
# (as on a machine that gets the repository and no install)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = ("planar", "dynunet", "unet")
#: Also accepted by ``--models``: ``planar-default``, the network of the packaged ``default``
#: config (instance norm in the decoder, deepest kernel depth 2), which ``planar`` (the published
#: network, no norm) is not; plane axis 0 as for ``planar``.
EXTRA_MODELS = ("planar-default",)
FULL_INPUTS = {"slab": (16, 256, 256), "head": (176, 256, 256)}
QUICK_INPUTS = {"slab": (16, 64, 64), "head": (32, 64, 64)}
# (input name, pass) in the order they run
CASES = (("slab", "fwd"), ("slab", "fwd+bwd"), ("head", "fwd"))


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


class PadToMultiple(nn.Module):
    """Zero-pad the spatial axes at the far end up to a multiple, run ``net``, crop back."""

    def __init__(self, net: nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = multiple

    def padded_shape(self, spatial: Sequence[int]) -> List[int]:
        return [s + (-s) % self.multiple for s in spatial]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad: List[int] = []
        for s in reversed(size):
            pad += [0, (-int(s)) % self.multiple]
        if any(pad):
            x = F.pad(x, pad)
        out = self.net(x)
        return out[:, :, : size[0], : size[1], : size[2]]


#: planar3d's networks the benchmarks time: the published one (no norm) and the packaged default
#: config's, what ``planar3d train`` gives without flags (instance norm, (2,3,3) deepest kernels).
PLANAR_NETWORKS = ("published", "default")


def planar_network_config(network: str = "published", width: float = 1.0, plane_axis: int = 0):
    """The :class:`~planar3d.networks.PlanarResUNetConfig` of ``network`` (:data:`PLANAR_NETWORKS`)
    at ``width``, one input channel, planes normal to ``plane_axis``, 2x2x2 pooling at every level
    (the default config's ``auto`` for an isotropic scan); every benchmark builds them here.

    Example:
        >>> planar_network_config("default").norm, planar_network_config("published", 0.5).norm
        ('instance', None)
    """
    from dataclasses import replace

    from planar3d.networks import PlanarResUNetConfig

    if network == "published":
        return PlanarResUNetConfig(in_channels=1, out_channels=1, plane_axis=plane_axis, width=width)
    if network != "default":
        raise ValueError(f"unknown planar network {network!r} (known: {', '.join(PLANAR_NETWORKS)})")
    from pipelines.config import load_config

    return replace(load_config(network).network.resolve(plane_axis, (True,) * 4), width=width)


def build_model(name: str) -> nn.Module:
    """The benchmarked networks, all 1 input and 1 output channel."""
    if name in ("planar", "planar-default"):
        from planar3d.networks import PlanarResUNet

        return PlanarResUNet(planar_network_config("published" if name == "planar" else "default"))
    if name == "dynunet":
        from monai.networks.nets import DynUNet

        strides = [[1, 1, 1]] + [[2, 2, 2]] * 5
        net = DynUNet(
            spatial_dims=3, in_channels=1, out_channels=1,
            kernel_size=[[3, 3, 3]] * 6, strides=strides, upsample_kernel_size=strides[1:],
            filters=(32, 64, 128, 256, 320, 320),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            res_block=False, deep_supervision=False,
        )
        return PadToMultiple(net, 32)
    if name == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3, in_channels=1, out_channels=1,
            channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS + EXTRA_MODELS)}")


def effective_shape(name: str, spatial: Sequence[int]) -> List[int]:
    """The spatial size the network really computes on (after its padding)."""
    if name == "dynunet":
        return [s + (-s) % 32 for s in spatial]
    if name == "planar":
        return [s + (-s) % 16 for s in spatial]  # 4 pools of 2 along every axis
    return list(spatial)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# one case (runs in its own subprocess)
# --------------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux ``VmHWM``) so the next case measures its own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak RSS since :func:`reset_peak_rss` (``VmHWM``; else the process-wide ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model_name: str, spatial: Sequence[int], pass_: str, device: torch.device) -> float:
    """FLOPs of one pass via FlopCounterMode on the meta device (no compute; falls back to real)."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(dev: torch.device) -> float:
        with torch.device(dev):
            model = build_model(model_name)
        x = torch.zeros((1, 1, *spatial), device=dev)
        counter = FlopCounterMode(display=False)
        with counter:
            if pass_ == "fwd":
                with torch.inference_mode():
                    model(x)
            else:
                model(x).float().mean().backward()
        return float(counter.get_total_flops())

    try:
        return run(torch.device("meta"))
    except Exception as exc:  # pragma: no cover - depends on operator meta support
        print(f"  meta FLOP count failed ({exc!r}); counting on {device}", file=sys.stderr)
        return run(device)


def run_case(
    model_name: str, spatial: Sequence[int], pass_: str, variant: str, warmup: int, repeats: int,
    slow_s: float, matmul_n: int,
) -> Dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    flops = count_flops(model_name, spatial, pass_, device)
    # the same matmul peak again in this process, right before timing: on a shared CPU the
    # ratio to this one is less sensitive to other load than the ratio to the run-wide peak
    local_peak = matmul_peak(device, torch.bfloat16 if variant.startswith("bf16") else torch.float32, matmul_n, 2)

    model = build_model(model_name).to(device)
    params = count_params(model)
    x = torch.randn((1, 1, *spatial), device=device)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if variant == "cl":  # channels_last_3d in fp32 (how planar3d predicts on the CPU)
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if variant.startswith("bf16-cl"):
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)

    if variant.endswith("+compile"):
        model = torch.compile(model)
    if pass_ == "fwd":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(x)
    else:
        model.train()

        def step() -> None:
            with autocast():
                loss = model(x).float().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

    rss_before = peak_rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: List[float] = []
    warmup_times: List[float] = []
    single_run = False
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
        else:
            warmup_times.append(elapsed)
            if elapsed > slow_s:  # one pass takes minutes: report that pass alone
                times, single_run = [elapsed], True
                break
    seconds = statistics.median(times)
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
        peak_kind = "cuda max allocated"
    else:
        peak_bytes = peak_rss_bytes()
        peak_kind = "peak RSS"
    return {
        "model": model_name, "input": list(spatial), "computed_input": effective_shape(model_name, spatial),
        "pass": pass_, "variant": variant, "params": params, "flops": flops,
        "seconds": seconds, "times": times, "warmup_times": warmup_times, "single_run": single_run,
        "local_peak_flops": local_peak, "pct_local_peak": 100 * flops / seconds / local_peak, "flops_per_s": flops / seconds,
        "peak_bytes": peak_bytes, "peak_kind": peak_kind, "rss_before_timing_bytes": rss_before,
        "device": str(device),
    }


# --------------------------------------------------------------------------------------------
# matmul peak
# --------------------------------------------------------------------------------------------


def _best_seconds(run, device: torch.device, repeats: int) -> float:
    """Best wall time of ``run()`` over ``repeats`` runs after one warm-up."""
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an n x n x n matrix product over ``repeats`` runs (after one warm-up).

    On the CPU the same product is also run through oneDNN, as a 1x1x1 convolution in
    channels_last_3d (the library the network's convolutions use), and the higher rate counts:
    ``torch.mm`` goes to MKL, whose fp32 GEMM on this project's AMD CPU reached 207-213 GFLOP/s
    where oneDNN's reached 418-463 (2026-11-27, twelfth session), so percentages of MKL's rate
    read above 100 % (docs/prediction.md, "The GEMM rate on this CPU").
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    if device.type == "cpu":
        rows, weight = pointwise_conv_operands(a, b)
        with torch.no_grad():
            best = min(best, _best_seconds(lambda: torch.nn.functional.conv3d(rows, weight), device, repeats))
    return 2.0 * n**3 / best


def pointwise_conv_operands(a: torch.Tensor, b: torch.Tensor):
    """``(input, weight)`` of a 1x1x1 convolution that computes ``a @ b`` (transposed, as
    ``(1, n, m, 1, 1)``): ``a``'s rows are voxels and its columns channels, channels_last_3d."""
    rows = a.t().reshape(1, a.shape[1], a.shape[0], 1, 1).contiguous(memory_format=torch.channels_last_3d)
    weight = b.t().reshape(b.shape[1], b.shape[0], 1, 1, 1).contiguous(memory_format=torch.channels_last_3d)
    return rows, weight


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def markdown_table(rows: List[Dict], peaks: Dict[str, float]) -> str:
    lines = [
        "| model | input (computed as) | pass | variant | params | GFLOP | time | GFLOP/s | % of peak | % of in-process peak | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        if r.get("computed_input") and r["computed_input"] != r["input"]:
            shape += " (" + "x".join(map(str, r["computed_input"])) + ")"
        if "error" in r:
            lines.append(f"| {r['model']} | {shape} | {r['pass']} | {r['variant']} | | | {r['error']} | | | | |")
            continue
        peak = peaks["bf16" if r["variant"].startswith("bf16") else "fp32"]
        lines.append(
            f"| {r['model']} | {shape} | {r['pass']} | {r['variant']} | {r['params'] / 1e6:.1f} M "
            f"| {r['flops'] / 1e9:.0f} | {fmt_time(r['seconds'])}{' ¹' if r.get('single_run') else ''} "
            f"| {r['flops_per_s'] / 1e9:.0f} | {100 * r['flops_per_s'] / peak:.0f} % | {r['pct_local_peak']:.0f} % "
            f"| {fmt_bytes(r['peak_bytes'])} |"
        )
    return "\n".join(lines)


def run_in_process(spec: Dict, spatial: Sequence[int]) -> Dict:
    """One case in this process; a failure (e.g. out of memory) becomes an error row."""
    import gc

    try:
        return run_case(spec["model"], spec["spatial"], spec["pass"], spec["variant"], spec["warmup"],
                        spec["repeats"], spec["slow_s"], spec["matmul_n"])
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        return dict(spec, input=list(spatial), error=f"failed: {str(error).splitlines()[0][:120]}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_isolated(spec: Dict, spatial: Sequence[int], timeout: float) -> Dict:
    """One case in a fresh process (``--isolate``)."""
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_case", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return dict(spec, input=list(spatial), error=f"over {timeout:.0f} s, stopped")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[:120]
        return dict(spec, input=list(spatial), error=f"failed: {reason}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs for a fast smoke run")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of planar,dynunet,unet (default) and planar-default")
    parser.add_argument("--json", dest="json_out", help="write all results to this JSON file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case")
    parser.add_argument("--slow", type=float, default=45.0,
                        help="CPU: if the warm-up pass takes longer than this (s), report it as the only run")
    parser.add_argument("--isolate", action="store_true",
                        help="run every case in a fresh process (slower start; a case's crash cannot end the run)")
    parser.add_argument("--variants", default=None,
                        help="comma list of fp32, cl (channels_last_3d fp32), bf16-cl, bf16-cl+compile "
                             "(default: fp32,cl on the CPU; fp32,bf16-cl on CUDA)")
    parser.add_argument("--cases", default=None, help="comma list of slab-fwd, slab-fwd+bwd, head-fwd (default: all)")
    parser.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                        help="CUDA: torch.backends.cudnn.benchmark for the fixed-shape cases (default on)")
    parser.add_argument("--_case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"

    if args._case:
        spec = json.loads(args._case)
        result = run_case(spec["model"], spec["spatial"], spec["pass"], spec["variant"], spec["warmup"],
                          spec["repeats"], spec["slow_s"], spec["matmul_n"])
        print("RESULT " + json.dumps(result))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS + EXTRA_MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS + EXTRA_MODELS)}")
    inputs = QUICK_INPUTS if args.quick else FULL_INPUTS
    variants = args.variants.split(",") if args.variants else (["fp32", "bf16-cl"] if cuda else ["fp32", "cl"])
    wanted_cases = set(args.cases.split(",")) if args.cases else None

    load_start = os.getloadavg()[0]
    n = 1024 if args.quick else (8192 if cuda else 4096)
    peaks = {"fp32": matmul_peak(device, torch.float32, n, 5 if cuda or args.quick else 4)}
    if cuda:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, n, 5)
    device_name = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    print(f"# bench_model.py  {datetime.datetime.now().isoformat(timespec='seconds')}  {device_name}  torch {torch.__version__}")
    print("# matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s ({n}x{n})" for k, v in peaks.items()), flush=True)

    rows: List[Dict] = []
    for model in models:
        for input_name, pass_ in CASES:
            if wanted_cases is not None and f"{input_name}-{pass_}" not in wanted_cases:
                continue
            spatial = inputs[input_name]
            big = not cuda and not args.quick and (input_name == "head" or pass_ == "fwd+bwd")
            warmup, repeats = (1, 2) if big else ((2, 5) if cuda or args.quick else (1, 3))
            for variant in variants:
                spec = {"model": model, "spatial": list(spatial), "pass": pass_, "variant": variant,
                        "warmup": warmup, "repeats": repeats, "slow_s": args.slow if not cuda else 1e9,
                        "matmul_n": n}
                t0 = time.perf_counter()
                if not args.isolate:
                    row = run_in_process(spec, spatial)
                else:
                    row = run_isolated(spec, spatial, args.timeout)
                row["wall_s"] = time.perf_counter() - t0
                rows.append(row)
                status = row.get("error") or f"{fmt_time(row['seconds'])}, {row['flops_per_s'] / 1e9:.0f} GFLOP/s, {fmt_bytes(row['peak_bytes'])}"
                print(f"  {model:8s} {input_name} {pass_:8s} {variant:8s} {status}  (case wall {row['wall_s']:.0f} s)",
                      file=sys.stderr, flush=True)
    print()
    print(markdown_table(rows, peaks))
    if any(r.get("single_run") for r in rows):
        print(f"\n¹ one pass only (the warm-up pass took over {args.slow:.0f} s), so it includes first-call overheads.")
    print(f"\nPeak memory: {'torch.cuda.max_memory_allocated' if cuda else 'peak RSS during the row (VmHWM reset before it; includes ~0.5 GiB of torch/MONAI and the weights)'}."
          f" Load average at the end: {os.getloadavg()[0]:.1f} (at the start {load_start:.1f}).")
    planar = [r for r in rows if r["model"] == "planar" and r["pass"] == "fwd" and "error" not in r and r["variant"] in ("fp32", "cl")]
    if planar and not cuda:
        best = max(100 * r["flops_per_s"] / peaks["fp32"] for r in planar)
        best_local = max(r["pct_local_peak"] for r in planar)
        verdict = "meets" if max(best, best_local) >= 60 else "misses"
        print(f"\nPlanar inference reaches {best:.0f} % of the run-wide fp32 matmul peak ({best_local:.0f} % of the"
              f" in-process one): {verdict} the 60 % goal.")
    if args.json_out:
        from planar3d.io import json_safe, write_json

        write_json(args.json_out, json_safe({"device": device_name, "torch": torch.__version__,
                                             "date": datetime.datetime.now().isoformat(),
                                             "matmul_peak_flops": peaks, "matmul_n": n, "quick": args.quick, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
