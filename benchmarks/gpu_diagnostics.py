"""Where issue 10's GPU time goes: what ``gpu_check.py`` does not show, in one short run.

A. **predict timeline** in one process: ``import torch``, planar3d's predict modules, CUDA start,
   loading a random full-width checkpoint, the warm-up, then each real scan twice (read and
   preprocess / model / post-process and write), so a first scan's cost can be split up.
B. **full-resolution micro-benchmarks** (176x256x256, bf16, channels_last_3d, inference): the
   96->1 head as cuDNN conv and as a matrix product over the channels; a 64->64 (1,3,3) conv +
   bias + ReLU eager and as one fused ``torch.cudnn_convolution_relu`` call (with its largest
   difference from eager).
C. **the whole-head inference pass** (176x256x256, bf16, channels_last_3d) of the published
   network and of the default config's, eager and then with planar3d's CUDA inference changes
   switched on one after the other (conv + bias + ReLU as one cuDNN call; a decoder level's first
   conv from the parts of its concatenation; instance norm read in place), interleaved over
   three rounds, each with its largest logit difference from eager.
D. **one training step** of the default config's network (2 x 128x128x32 patches, bf16-cl,
   forward, backward, clipping, AdamW; no loader) timed, then its kernels by GPU time, then the
   same step with the network under ``torch.compile`` (CUDA only).

On a machine without CUDA it runs the same on the CPU with tiny sizes (a smoke run).

Usage (from the project root)::

    python benchmarks/gpu_diagnostics.py [--real FOLDER_OF_NIFTI] [--parts ABCD]
    python benchmarks/gpu_diagnostics.py --parts C --cpu-full-size   # part C's before/after on the CPU at full size
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path, PurePath

T0 = time.perf_counter()
PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class Clock:
    """Prints the seconds since the previous mark and since the process start."""

    def __init__(self):
        self.last = T0

    def mark(self, what: str) -> None:
        now = time.perf_counter()
        print(f"  {what}: {now - self.last:.3f} s (t={now - T0:.2f})", flush=True)
        self.last = now


def predict_timeline(clock: Clock, real: Path, work: Path) -> str:
    """Part A; returns the device it ran on (``cuda`` where torch sees one, else ``cpu``)."""
    print("## A. predict timeline in one process", flush=True)
    import torch

    clock.mark("import torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from planar3d.inference import warm_up
    from pipelines.predict import load_models
    from pipelines.predict_setup import ScanInput
    from pipelines.predict_steps import OutputPaths, finish_scan, prepare_scan, run_model

    clock.mark("import planar3d's predict modules")
    if device == "cuda":
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    clock.mark("CUDA start")
    from bench_predict import _checkpoint

    checkpoint = _checkpoint(work / "model", 1.0 if device == "cuda" else 0.0625)
    clock.mark("write a random checkpoint (not part of predict)")
    model, settings, record = load_models([str(checkpoint)], device)
    clock.mark("load_models")
    warm_up(model, settings.device, settings.in_channels, settings.precision)
    clock.mark("warm_up")
    scans = sorted(real.glob("*.nii.gz"))
    if not scans:
        raise FileNotFoundError(f"{real}: no .nii.gz scans (--real names the folder)")
    for repeat in range(2):
        for path in scans:
            scan = ScanInput(path, PurePath(f"r{repeat}_{path.name}"))
            start = time.perf_counter()
            prepared = prepare_scan(scan, settings)
            shape = tuple(prepared.volume.shape)
            read = time.perf_counter()
            probability = run_model(model, prepared, settings)
            computed = time.perf_counter()
            finish_scan(prepared, probability, OutputPaths.of(work / "out", scan.relative), settings, record)
            print(f"  pass {repeat} {path.name} {shape}: read+preprocess {read - start:.3f} s, model {computed - read:.3f} s, "
                  f"post-process+write {time.perf_counter() - computed:.3f} s", flush=True)
    return device


def _milliseconds(function, device: str, repeats: int = 10, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        function()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def micro_benchmarks(device: str) -> None:
    import torch

    from planar3d.networks.layers import pointwise_conv_as_matmul

    print("\n## B. full-resolution micro-benchmarks (inference, channels_last_3d; bf16 on CUDA)", flush=True)
    shape = (176, 256, 256) if device == "cuda" else (16, 64, 64)
    layout = torch.channels_last_3d
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.inference_mode():
        head = torch.nn.Conv3d(96, 1, 1).to(device, dtype).to(memory_format=layout)
        x = torch.randn(1, 96, *shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        conv_ms = _milliseconds(lambda: head(x), device)
        matmul_ms = _milliseconds(lambda: pointwise_conv_as_matmul(x, head.weight, head.bias), device)
        print(f"  head 96->1 over {shape}: cuDNN/oneDNN conv {conv_ms:.2f} ms, matrix product {matmul_ms:.2f} ms", flush=True)
        del x
        conv = torch.nn.Conv3d(64, 64, (1, 3, 3), padding=(0, 1, 1)).to(device, dtype).to(memory_format=layout)
        x = torch.randn(1, 64, *shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        line = f"  conv 64->64 (1,3,3) + bias + ReLU: eager {_milliseconds(lambda: torch.relu_(conv(x)), device):.2f} ms"
        try:
            def fused():
                return torch.cudnn_convolution_relu(x, conv.weight, conv.bias, (1, 1, 1), (0, 1, 1), (1, 1, 1), 1)

            difference = (fused().float() - torch.relu(conv(x)).float()).abs().max().item()
            line += f", cudnn_convolution_relu {_milliseconds(fused, device):.2f} ms (largest difference {difference:.3g})"
        except (RuntimeError, NotImplementedError) as error:
            line += f", cudnn_convolution_relu not available: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(line, flush=True)


def head_pass_variants(device: str, cpu_full_size: bool = False) -> None:
    """Part C: the whole-head inference pass of the published network and of the default config's
    with planar3d's CUDA inference changes switched on one after the other (module settings of
    ``planar3d.networks``), the variants interleaved over three rounds, the fastest round kept.
    On the CPU (a smoke run) they are switched on for the CPU, with a reference conv + ReLU
    standing in for the cuDNN call; with ``cpu_full_size`` the CPU runs the full size and width in
    fp32, before and after only (one round, one warm-up pass, one timed pass)."""
    import contextlib

    import torch

    from bench_model import planar_network_config
    from planar3d.networks import PlanarResUNet, layers, res_unet

    cuda = device == "cuda"
    print("\n## C. whole-head inference pass, CUDA changes one after the other "
          f"({'bf16 autocast' if cuda else 'fp32'}, channels_last_3d)", flush=True)
    full = cuda or cpu_full_size
    shape = (176, 256, 256) if full else (16, 32, 32)
    width = 1.0 if full else 0.0625
    layout = torch.channels_last_3d
    settings = ("FUSED_CONV_RELU_DEVICES", "CHANNELS_LAST_INSTANCE_NORM_DEVICES")
    saved = ({name: getattr(layers, name) for name in settings + ("_cudnn_conv_relu",)},
             res_unet.SPLIT_CONCATENATION_DEVICES)
    if not cuda:
        layers._cudnn_conv_relu = lambda x, w, b, s, p, d, g: torch.relu(torch.nn.functional.conv3d(x, w, b, s, p, d, g))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    x = torch.randn(1, 1, *shape, device=device).contiguous(memory_format=layout)
    networks = {
        "published (no norm)": PlanarResUNet(planar_network_config("published", width)),
        "default config (instance norm)": PlanarResUNet(planar_network_config("default", width)),
    }
    on = (device,)
    variants = [  # (name, fused conv + ReLU, concatenations split, instance norm in place)
        ("eager (before)", (), (), ()),
        ("+ fused conv+bias+ReLU", on, (), ()),
        ("+ concatenations split", on, on, ()),
        ("+ instance norm in place (all on: the default)", on, on, on),
    ]
    rounds, repeats, warmup = (3, 10, 3) if cuda else (1, 1, 1) if cpu_full_size else (3, 2, 3)
    if cpu_full_size:  # the CPU's own before and after: concatenations were already split there
        variants = [("before (concatenations split)", (), on, ()), variants[-1]]
    try:
        for label, network in networks.items():
            network = network.to(device).eval().to(memory_format=layout)
            times = {name: [] for name, *_ in variants}
            differences = {}
            reference = None
            for _ in range(rounds):
                for name, fused, split, norm in variants:
                    layers.FUSED_CONV_RELU_DEVICES, layers.CHANNELS_LAST_INSTANCE_NORM_DEVICES = fused, norm
                    res_unet.SPLIT_CONCATENATION_DEVICES = split + (("cpu",) if cuda else ())

                    def forward():
                        with torch.inference_mode(), autocast():
                            return network(x)

                    try:
                        out = forward().float()
                        reference = out if reference is None else reference
                        differences[name] = (out - reference).abs().max().item()
                        times[name].append(_milliseconds(forward, device, repeats, warmup))
                    except (RuntimeError, NotImplementedError) as error:
                        differences[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            scale = reference.abs().max().item() if reference is not None else float("nan")
            for name, *_ in variants:
                if times[name]:
                    print(f"  {label}, {name}: {min(times[name]):.2f} ms (rounds: "
                          f"{', '.join(f'{t:.2f}' for t in times[name])}); largest logit difference from eager "
                          f"{differences[name]:.3g} (logits up to {scale:.3g})", flush=True)
                else:
                    print(f"  {label}, {name}: {differences[name]}", flush=True)
            del network, reference
            if cuda:
                torch.cuda.empty_cache()
    finally:
        for name, value in saved[0].items():
            setattr(layers, name, value)
        res_unet.SPLIT_CONCATENATION_DEVICES = saved[1]


def training_step(device: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_model import planar_network_config
    from planar3d.networks import PlanarResUNet

    print("\n## D. one training step of the default network, 2 patches (bf16, channels_last_3d on CUDA)", flush=True)
    layout = torch.channels_last_3d
    network = PlanarResUNet(planar_network_config("default", plane_axis=2)).to(device).to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(network.parameters(), 3e-4)
    patch = (128, 128, 32) if device == "cuda" else (32, 32, 16)
    x = torch.randn(2, 1, *patch, device=device).contiguous(memory_format=layout)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = network(x).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = _milliseconds(step, device)
    voxels = 2 * patch[0] * patch[1] * patch[2]
    print(f"  {patch} x 2: forward + backward + clipping + AdamW {ms:.2f} ms = {voxels / ms * 1000:.3g} voxels/s", flush=True)
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as profiler:
        step()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=70))
    if device != "cuda":
        return  # minutes of compilation on the CPU for nothing a smoke run checks
    eager_forward = network.forward
    network.forward = torch.compile(eager_forward)  # the same step with the network compiled
    start = time.perf_counter()
    try:
        step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        ms = _milliseconds(step, device)
        print(f"  torch.compile(network): first step (compilation) {compile_s:.1f} s, then {ms:.2f} ms a step = "
              f"{voxels / ms * 1000:.3g} voxels/s", flush=True)
    except Exception as error:  # a compiler failure is a finding, not the end of the run
        print(f"  torch.compile(network) failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
    finally:
        network.forward = eager_forward


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "real",
                        help="folder of real .nii.gz scans for the timeline")
    parser.add_argument("--parts", default="ABCD", help="which parts to run, e.g. C (default ABCD)")
    parser.add_argument("--cpu-full-size", action="store_true",
                        help="on the CPU, part C at full size and width (before and after only; minutes)")
    args = parser.parse_args(argv)
    clock = Clock()
    if "A" in args.parts:
        with tempfile.TemporaryDirectory(prefix="gpu_diagnostics_") as tmp:
            device = predict_timeline(clock, args.real, Path(tmp))  # imports torch first: its time is on the timeline
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "B" in args.parts:
        micro_benchmarks(device)
    if "C" in args.parts:
        head_pass_variants(device, args.cpu_full_size)
    if "D" in args.parts:
        training_step(device)
    clock.mark("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
