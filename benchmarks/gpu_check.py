"""Issue 10's GPU rows in one run (under 5 minutes on one H100): model, training, folder predict.

1. **model**: ``bench_model.py`` in this process: the whole head 176x256x256 forward (fp32 and
   bf16 + channels_last_3d) and the 16-plane training slab (bf16-cl), for the planar res-u-net
   and its MONAI peers (DynUNet nnU-Net-like, UNet); then the planar whole head again with
   ``cudnn.benchmark`` off (the prediction default, since scan shapes vary) and under
   ``torch.compile``.
   Target: whole head bf16-cl <= 25 ms.
2. **train**: ``planar3d train`` (packaged ``default`` config, 3 epochs, validation off) on
   synthetic 1 mm phantoms in a subprocess while ``nvidia-smi`` samples GPU utilisation every
   0.5 s, once per training loader (:data:`TRAIN_LOADERS`: MONAI with 2 workers as measured in
   issue 10; MONAI with ``num_workers: auto`` and persistent workers; ``data.loader: device``,
   which is what ``data.loader: auto`` of the default config picks on CUDA), every row with the
   default recipe (hard-negative sampling, scanner augmentation; ``--tiny`` adds them to ``tiny``);
   reports the training voxels/s of ``metrics.csv`` and the utilisation (mean, median, share of
   samples >= 85 %), then each loader's rate alone (``bench_loader.py``) and the host-device
   synchronisations it causes. Targets: >= 5e7 voxels/s, GPU busy >= 85 %.
3. **predict**: ``planar3d predict --device cuda`` in a fresh process on the real scans of
   ``../shared/data/real`` (``--real``) repeated to 20 scans (random weights, full width): first-scan time
   from the process start (imports, CUDA start-up and warm-up included) and steady scans/s
   from the masks' write times. Targets: first scan <= 3 s, >= 5 scans/s.
4. **compile**: the planar whole head under ``torch.compile``, last, so that a long compilation
   cannot hold up the other rows.

Steps run in the order model, predict, train, compile. A step that fails prints its traceback
and the next one still runs; a step is not started once the run has used ``--budget`` seconds
(the exit status is 1 if any step failed or was skipped that way).

``--tiny`` runs the same three steps on the CPU with tiny sizes (seconds; the test suite runs it).
Every figure is printed as a Markdown table with the date and the device.

Usage (from the project root)::

    python benchmarks/gpu_check.py                 # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --tiny          # CPU smoke run of the same steps
    python benchmarks/gpu_check.py --skip train    # any of model, train, predict
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL = PROJECT_ROOT.parent / "shared" / "data" / "real"
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


#: Seconds one subprocess (a training run, the folder prediction) may take before it is reported as failed.
STEP_TIMEOUT_S = 240


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*args: str) -> List[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


# --- 1. model ------------------------------------------------------------------------------------


def check_model(tiny: bool) -> None:
    import bench_model

    print("## 1. Model forward / forward+backward (bench_model.py, one process)\n", flush=True)
    if tiny:
        bench_model.main(["--quick", "--models", "planar,unet", "--variants", "fp32,cl", "--cases", "head-fwd"])
        return
    bench_model.main(["--variants", "fp32,bf16-cl", "--cases", "head-fwd"])
    bench_model.main(["--variants", "bf16-cl", "--cases", "slab-fwd,slab-fwd+bwd"])
    print("\nThe default config's network (instance norm in the decoder; what train and predict run):\n")
    bench_model.main(["--models", "planar-default", "--variants", "bf16-cl", "--cases", "head-fwd,slab-fwd+bwd"])
    print("\ncuDNN benchmark off (planar3d predict's setting):\n")
    bench_model.main(["--models", "planar", "--variants", "bf16-cl", "--cases", "head-fwd", "--cudnn-benchmark", "off"])


def check_compile(tiny: bool) -> None:
    """The planar whole head under ``torch.compile``: its own step, run last, so that a long
    compilation cannot hold up the other rows."""
    import bench_model

    print("## 4. torch.compile (planar only; the first call's compilation is in the warm-up, not in the time)\n",
          flush=True)
    if tiny:
        return  # minutes of compilation on the CPU for nothing this smoke run checks
    bench_model.main(["--models", "planar", "--variants", "bf16-cl+compile", "--cases", "head-fwd"])


# --- 2. training ---------------------------------------------------------------------------------


def parse_sample(line: str) -> Optional[Tuple[float, float]]:
    """``(wall-clock time, utilisation %)`` of one ``nvidia-smi --query-gpu=timestamp,utilization.gpu``
    line, else None. The time is nvidia-smi's own (local time, as ``time.time()`` counts it):
    nvidia-smi writes to a pipe in blocks, so the time a line is read can be seconds late (the likely
    reason why this session's H100 and H200 runs showed 0 % in the middle of training epochs).

    Example:
        >>> import datetime
        >>> t, u = parse_sample("2026/11/27 02:41:58.250, 87")
        >>> u, datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")
        (87.0, '02:41:58.250000')
        >>> parse_sample("[N/A]") is None
        True
    """
    try:
        stamp, value = line.strip().split(",")[:2]
        when = datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return when, float(value)
    except ValueError:
        return None


class UtilisationSampler:
    """``nvidia-smi`` GPU utilisation samples (percent) every ``interval_ms`` while running."""

    def __init__(self, interval_ms: int = 500):
        self.samples: List[float] = []
        self.times: List[float] = []  # wall clock (time.time) of each sample
        self.process: Optional[subprocess.Popen] = None
        self.interval_ms = interval_ms
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "UtilisationSampler":
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
                stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self.times.append(sample[0])
                self.samples.append(sample[1])

    def window(self, start: float, end: float) -> "UtilisationSampler":
        """The samples taken between wall-clock times ``start`` and ``end`` (a copy)."""
        return self.within([(start, end)])

    def within(self, intervals: Sequence[Tuple[float, float]]) -> "UtilisationSampler":
        """The samples taken inside any of the wall-clock ``(start, end)`` intervals (a copy)."""
        part = UtilisationSampler(self.interval_ms)
        inside = [any(start <= t <= end for start, end in intervals) for t in self.times]
        part.samples = [s for s, keep in zip(self.samples, inside) if keep]
        part.times = [t for t, keep in zip(self.times, inside) if keep]
        return part

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def summary(self) -> str:
        if not self.samples:
            return "no nvidia-smi samples (no GPU or no nvidia-smi)"
        busy = sum(s >= 85 for s in self.samples) / len(self.samples)
        return (f"{len(self.samples)} samples: mean {statistics.mean(self.samples):.0f} %, median "
                f"{statistics.median(self.samples):.0f} %, min {min(self.samples):.0f} %, >= 85 % in {100 * busy:.0f} % of samples")


_EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO epoch (\d+)/\d+ .*"
                         r"no validation this epoch .* ([0-9.]+) s [0-9.e+]+ vox/s\s*$")


def training_intervals(train_log: str, first_epoch: int = 2) -> List[Tuple[float, float]]:
    r"""Wall-clock ``(start, end)`` of each training epoch from ``first_epoch`` on that ran no
    validation, from ``train.log``'s epoch lines: the line's time (local, as ``time.time()``
    counts it) less the epoch's seconds. Until the tenth session the window was the epochs'
    summed seconds before ``metrics.csv``'s last write, which the last epoch's validation and
    checkpoint follow: it held no training, and the H200 lease read 0 % there.

    Example:
        >>> log = ("2026-11-27 10:09:13,918 INFO epoch 1/3 loss 1.56 (lesion voxels predicted/present 6.35) no validation this epoch lr 3.33e-04 7.0 s 1.68e+06 vox/s\n"
        ...        "2026-11-27 10:09:20,720 INFO epoch 2/3 loss 1.44 (lesion voxels predicted/present 1.11) no validation this epoch lr 6.67e-04 6.8 s 1.74e+06 vox/s\n"
        ...        "2026-11-27 10:09:30,000 INFO epoch 3/3 loss 1.04 (lesion voxels predicted/present 0.00) val lesion_f1 0.1 lr 1.00e-03 6.8 s 1.73e+06 vox/s")
        >>> [(round(end - start, 1), datetime.datetime.fromtimestamp(end).strftime("%H:%M:%S.%f")) for start, end in training_intervals(log)]
        [(6.8, '10:09:20.720000')]
    """
    intervals = []
    for line in train_log.splitlines():
        match = _EPOCH_LINE.match(line)
        if match and int(match.group(2)) >= first_epoch:
            end = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            intervals.append((end - float(match.group(3)), end))
    return intervals


#: The training loaders compared in one run: the one issue 10 measured (MONAI transforms in 2
#: DataLoader workers), MONAI with ``num_workers: auto`` and persistent workers, and the device loader.
TRAIN_LOADERS = (("monai, 2 workers (issue 10's)", ["data.loader=monai", "data.num_workers=2"]),
                 ("monai, workers auto, persistent", ["data.loader=monai", "data.num_workers=auto",
                                                      "data.persistent_workers=true"]),
                 ("device", ["data.loader=device"]))
#: ``--train-loaders`` keys of :data:`TRAIN_LOADERS` (their names hold commas).
LOADER_KEYS = {"monai-2": TRAIN_LOADERS[0][0], "monai-auto": TRAIN_LOADERS[1][0], "device": TRAIN_LOADERS[2][0]}
#: The packaged default recipe's sampling and scanner augmentation, for configs that lack them (``--tiny``).
RECIPE_OVERRIDES = ("data.sampling=lesion_hard_negative", "data.ratios=[1, 1, 1]", "augmentation.scanner={}")


def check_train(tiny: bool, work: Path, device: str, loaders: Sequence[str] = ()) -> None:
    """``loaders``: names of :data:`TRAIN_LOADERS` to run (default all)."""
    from planar3d.data.synth import write_synthetic_dataset

    print("\n## 2. Training throughput (planar3d train), old and new loader in the same run\n", flush=True)
    manifest = write_synthetic_dataset(work / "train_data", 4 if tiny else 8, seed=0, size="small" if tiny else "full",
                                       geometries=("3d",))
    config = "tiny" if tiny else "default"
    # full: 48 patches a volume, ~120 steps an epoch on the training phantoms of fold 0. With 16
    # (the 42-step epochs issue 10 measured) an epoch lasted 1.5 s on an H100, too short for
    # 0.5 s utilisation samples. The first epoch includes cuDNN's autotuning.
    samples_per_volume = 48
    # tiny: the tiny network and patches with the default recipe's sampling and scanner augmentation
    # (ScannerAugmentation's defaults are default.yaml's), so every loader row runs the recipe
    overrides = (["optim.epochs=1", "data.samples_per_volume=1", "validation.every=1000", *RECIPE_OVERRIDES] if tiny
                 else ["optim.epochs=3", "validation.every=1000", f"data.samples_per_volume={samples_per_volume}"])
    print(f"config {config} {' '.join(overrides)}\n")
    print("| loader | seconds per epoch | training voxels/s (last epoch) | wall incl. start-up "
          "| GPU utilisation in epochs 2.. | GPU utilisation, whole process |")
    print("|---|---|---|---|---|---|")
    chosen = [(name, loader) for name, loader in TRAIN_LOADERS if not loaders or name in loaders]
    for name, loader in chosen:
        run = work / f"train_run_{len(name)}_{loader[0].split('=')[1]}"
        command = _cli("train", "--manifest", str(manifest), "--fold", "0", "--out", str(run), "--config", config,
                       "--device", device, "--encoder-weights", "none", *overrides, *loader)
        start = time.perf_counter()
        with UtilisationSampler() as sampler:
            try:
                completed = subprocess.run(command, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                                           timeout=STEP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"| {name} | training failed: over {STEP_TIMEOUT_S} s | | | | {sampler.summary()} |", flush=True)
                continue
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            print(f"| {name} | training failed (exit {completed.returncode}): {completed.stderr[-1500:]!r} | | | | |")
            continue
        with open(run / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        epochs = ", ".join(f"{float(r['seconds']):.1f}" for r in rows)
        # the epochs after the first (cuDNN autotuning, warm-up) that ran no validation, as
        # train.log times them; the process start, data caching, validation and exit are left out
        training = sampler.within(training_intervals((run / "train.log").read_text()))
        print(f"| {name} | {epochs} | {float(rows[-1]['voxels_per_second']):.3g} | {wall:.0f} s | {training.summary()} "
              f"| {sampler.summary()} |", flush=True)
    # the loaders alone (no network): the most each can feed; on CUDA timed up to a synchronisation
    from bench_loader import loader_rate
    from pipelines.config import load_config

    print("\nLoaders alone (benchmarks/bench_loader.py, same data and config, no network):\n")
    print("| loader | training voxels/s delivered | host syncs in the warm-up epoch (CUDA) |")
    print("|---|---|---|")
    for name, loader in chosen:
        result = loader_rate(manifest, load_config(config, overrides + loader), device, epochs=1 if tiny else 2)
        print(f"| {name} | {result['voxels_per_second']:.3g} | {result['host_syncs']} |", flush=True)


# --- 3. folder prediction ------------------------------------------------------------------------


def check_predict(tiny: bool, work: Path, device: str, real: Path) -> None:
    from bench_predict import _checkpoint

    print("\n## 3. planar3d predict on a folder (fresh process)\n", flush=True)
    inputs = work / "predict_in"
    inputs.mkdir()
    if tiny:
        from planar3d.data.synth import write_synthetic_dataset

        manifest = write_synthetic_dataset(work / "predict_data", 3, seed=1, size="small", geometries=("3d",))
        scans = sorted((manifest.parent / "images").glob("*.nii*"))
        width = 0.0625
    else:
        scans = sorted(real.glob("*.nii.gz"))
        if not scans:
            raise FileNotFoundError(f"{real}: no .nii.gz scans to predict (--real names the folder)")
        width = 1.0
    copies = 1 if tiny else max(1, -(-20 // max(len(scans), 1)))
    for copy in range(copies):
        for scan in scans:
            (inputs / f"c{copy}_{scan.name}").symlink_to(scan.resolve())
    model = _checkpoint(work / "predict_model", width)
    out = work / "predict_out"
    start_wall = time.time()
    completed = subprocess.run(_cli("predict", "-i", str(inputs), "-o", str(out), "--model", str(model), "--device", device),
                               cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    total = time.time() - start_wall
    masks = sorted(out.rglob("*_mask.nii.gz"), key=lambda p: p.stat().st_mtime)
    if completed.returncode != 0 or not masks:
        print(f"predict failed (exit {completed.returncode}):\n{completed.stderr[-2000:]}")
        return
    times = [p.stat().st_mtime - start_wall for p in masks]
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    print("| scans | width | first mask written after (process start) | steady scans/s (masks 1..n) | whole run |")
    print("|---|---|---|---|---|")
    print(f"| {len(masks)} ({len(scans)} distinct) | {width} | {times[0]:.1f} s | {steady:.2f} | {total:.1f} s |")
    print(f"\nGeometry on {device}: {_same_geometry(masks, inputs)} of {len(masks)} masks have their scan's exact "
          "shape, affine, qform/sform codes and orientation.")
    from planar3d.pipelining import pipeline_workers

    per_step = [line.strip() for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("time per scan")]
    print(f"\nplanar3d predict's own summary ({pipeline_workers(device)} read and {pipeline_workers(device)} write threads): "
          f"{per_step[-1] if per_step else 'no per-step line'}")


def _same_geometry(masks: Sequence[Path], inputs: Path) -> int:
    """How many masks carry exactly their input scan's grid (``<scan>_mask.nii.gz`` beside ``<scan>.nii.gz``)."""
    import nibabel as nib
    import numpy as np

    same = 0
    for mask_path in masks:
        scan = nib.load(inputs / mask_path.name.replace("_mask.nii.gz", ".nii.gz"))
        mask = nib.load(mask_path)
        same += (mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)
                 and np.array_equal(mask.header.get_qform(), scan.header.get_qform())
                 and np.array_equal(mask.header.get_sform(), scan.header.get_sform())
                 and int(mask.header["qform_code"]) == int(scan.header["qform_code"])
                 and int(mask.header["sform_code"]) == int(scan.header["sform_code"])
                 and nib.aff2axcodes(mask.affine) == nib.aff2axcodes(scan.affine))
    return same


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny sizes")
    parser.add_argument("--skip", default="", help="comma list of model, train, predict, compile")
    parser.add_argument("--train-loaders", default="",
                        help="comma list of training loaders to run (default all): " + ", ".join(LOADER_KEYS))
    parser.add_argument("--real", type=Path, default=REAL,
                        help=f"folder of real .nii.gz scans for the predict step (default {REAL}; on a machine "
                             "that receives only the repository, a copy inside it)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds; a step is not started once the run has used this much (default 420)")
    args = parser.parse_args(argv)
    import torch

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    keys = [k.strip() for k in args.train_loaders.split(",") if k.strip()]
    if any(k not in LOADER_KEYS for k in keys):
        parser.error(f"--train-loaders takes {', '.join(LOADER_KEYS)}; got {args.train_loaders!r}")
    loaders = [LOADER_KEYS[k] for k in keys]
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()}-core CPU"
    print(f"# gpu_check {datetime.datetime.now().isoformat(timespec='seconds')}  {name}  torch {torch.__version__}"
          f"{' (--tiny)' if args.tiny else ''}\n", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        failed = []
        # predict before train: its rows are the cheaper ones, and a lease can end mid-run
        for step, run in (("model", lambda: check_model(args.tiny)),
                          ("predict", lambda: check_predict(args.tiny, work, device, args.real)),
                          ("train", lambda: check_train(args.tiny, work, device, loaders)),
                          ("compile", lambda: check_compile(args.tiny))):
            if step in skip:
                continue
            if time.perf_counter() - start > args.budget:
                print(f"\n({step}: not started, the run has used its --budget of {args.budget:.0f} s)\n", flush=True)
                failed.append(step)
                continue
            step_start = time.perf_counter()
            try:
                run()
            except Exception:  # one step's failure must not cost the other steps' rows
                traceback.print_exc(file=sys.stdout)
                print(f"\n({step}: FAILED)", flush=True)
                failed.append(step)
            print(f"\n({step}: {time.perf_counter() - step_start:.0f} s)\n", flush=True)
    print(f"\ngpu_check finished in {time.perf_counter() - start:.0f} s" + (f"; failed or skipped: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
