"""Training-input throughput alone (no network): the MONAI loader against the device loader.

Builds both loaders of ``pipelines`` on the same cases and config and times how fast each
delivers training batches on the device (``data.loader: monai`` with its workers and pinned
memory, then copied; ``data.loader: device``), after one warm-up epoch; on CUDA the clock stops
after a synchronisation, so queued work is counted. Prints voxels/s per loader: the rate a
training loop could at most be fed at. A figure on the CPU says nothing about a GPU's.

Usage (from the project root)::

    python benchmarks/bench_loader.py [--manifest M.json | --cases 6 --size full] [--config default]
        [--device cuda] [--epochs 2] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def _synchronise(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _host_syncs(run, device) -> Optional[int]:
    """Run ``run()``; on CUDA count the host-device synchronisations it caused (each one stops the
    host from queueing work ahead of the GPU). ``None`` on the CPU."""
    import warnings

    import torch

    if torch.device(device).type != "cuda":
        run()
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def loader_rate(manifest, config, device, epochs: int = 2) -> dict:
    """``{"setup_s", "voxels_per_second", "batches"}`` of ``config.data.loader`` on fold 0's training cases."""
    import torch

    from planar3d.data.manifest import load_manifest
    from pipelines import data as D
    from pipelines.config import resolve_loader
    from pipelines.device_batches import DevicePatchLoader

    device = torch.device(device)
    cases = load_manifest(manifest).train_cases(0)
    plane_axis, _ = D.resolve_geometry(config, cases)
    start = time.perf_counter()
    if resolve_loader(config.data.loader, device.type) == "device":
        source = DevicePatchLoader.from_cases(config, cases, plane_axis, device)

        def batches(epoch):
            return source.epoch_batches(epoch)
    else:
        shapes = [D.case_shape(c) for c in cases]
        dataset = D.build_dataset(config, cases, D.training_transform(config, plane_axis, shapes), None)

        def batches(epoch):
            for image, label in D.patch_batches(D.make_loader(dataset, config, epoch, device=device), config.data.batch_size):
                yield image.to(device, non_blocking=True), label.to(device, non_blocking=True)
    setup = time.perf_counter() - start
    syncs = _host_syncs(lambda: [None for _ in batches(0)], device)  # warm-up: worker start, first allocations
    _synchronise(device)
    voxels, count = 0, 0
    start = time.perf_counter()
    for epoch in range(1, 1 + epochs):
        for image, label in batches(epoch):
            voxels += label.numel()
            count += 1
    _synchronise(device)
    return {"setup_s": setup, "voxels_per_second": voxels / (time.perf_counter() - start), "batches": count,
            "host_syncs": syncs}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", default="full", help="synthetic phantoms: full (1 mm) or small")
    parser.add_argument("--config", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="0,2,auto", help="data.num_workers values for the MONAI loader")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from pipelines.config import load_config

    manifest = args.manifest
    if manifest is None:
        from planar3d.data.synth import write_synthetic_dataset

        manifest = write_synthetic_dataset(Path(tempfile.mkdtemp(prefix="bench_loader_")), args.cases, 0, size=args.size,
                                           geometries=("3d",))
    variants = [["data.loader=monai", f"data.num_workers={w}"] for w in args.workers.split(",") if w]
    variants.append(["data.loader=device"])
    print(f"config {args.config} {' '.join(args.overrides)}; device {args.device}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads\n")
    print("| loader | setup s | batches | training voxels/s delivered | host syncs in the warm-up epoch (CUDA) |")
    print("|---|---|---|---|---|")
    for variant in variants:
        config = load_config(args.config, list(args.overrides) + ["val_cases=0"] + variant)
        result = loader_rate(manifest, config, args.device, args.epochs)
        print(f"| {' '.join(variant)} | {result['setup_s']:.1f} | {result['batches']} | {result['voxels_per_second']:.3g} | "
              f"{result['host_syncs']} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
