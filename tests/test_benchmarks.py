"""The GPU check script runs end to end on the CPU with tiny settings (a future GPU session runs it for real)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_all_steps_on_cpu():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny"],
                               cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for heading in ("## 1. Model", "## 2. Training throughput", "## 3. planar3d predict on a folder", "## 4. torch.compile"):
        assert heading in out
    assert "| planar | 32x64x64 | fwd | cl |" in out          # the model table has the planar channels_last row
    assert "config tiny optim.epochs=1" in out and "failed" not in out
    assert "data.sampling=lesion_hard_negative" in out and "augmentation.scanner={}" in out  # the default recipe
    for loader in ("| monai, 2 workers (issue 10's) |", "| monai, workers auto, persistent |", "| device |"):
        assert out.count(loader) == 2, loader  # trained, and timed alone
    assert "| 3 (3 distinct) | 0.0625 |" in out               # all three masks written
    assert "Geometry on cpu: 3 of 3 masks have" in out
    assert "(2 read and 2 write threads): time per scan: load" in out


def test_gpu_check_reports_steps_past_its_budget_and_exits_nonzero():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--budget", "-1"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1, completed.stderr[-3000:]
    for step in ("model", "predict", "train", "compile"):
        assert f"({step}: not started, the run has used its --budget of -1 s)" in completed.stdout
    assert "failed or skipped: model, predict, train, compile" in completed.stdout


def test_utilisation_window_keeps_the_samples_between_two_times():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import UtilisationSampler

    sampler = UtilisationSampler()
    sampler.samples, sampler.times = [0.0, 90.0, 100.0, 10.0], [1.0, 2.0, 3.0, 4.0]
    training = sampler.window(2.0, 3.5)
    assert training.samples == [90.0, 100.0] and training.times == [2.0, 3.0]
    assert "2 samples: mean 95 %" in training.summary() and ">= 85 % in 100 % of samples" in training.summary()
    assert sampler.window(5.0, 6.0).summary().startswith("no nvidia-smi samples")


def test_utilisation_samples_carry_nvidia_smis_own_time():
    import doctest

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    assert doctest.testmod(gpu_check).failed == 0
    assert gpu_check.parse_sample("2026/11/27 02:41:58.250, [N/A]") is None


@pytest.mark.slow
def test_gpu_diagnostics_smoke_run_on_cpu():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_diagnostics.py")],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for heading in ("## A. predict timeline", "## B. full-resolution micro-benchmarks", "## C. whole-head inference pass",
                    "## D. one training step"):
        assert heading in out
    # the fusion variants ran (on the CPU with a reference conv + ReLU) and agree with eager
    variants = [line for line in out.splitlines() if line.startswith(("  published (no norm), ", "  default config "))]
    assert len(variants) == 8 and all("largest logit difference from eager " in line for line in variants), variants
    assert out.count("  pass 0 ") == out.count("  pass 1 ") == 5        # the five real scans, twice
    assert "matrix product" in out and "cudnn_convolution_relu not available" in out  # CPU: no cuDNN


def test_the_cpu_matmul_peak_also_times_the_product_through_onednn():
    """bench_model.matmul_peak runs a @ b as a 1x1x1 convolution too (oneDNN, what the network's
    convolutions use), because MKL's torch.mm is not the CPU's peak on every vendor's CPU."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_model import matmul_peak, pointwise_conv_operands

    a, b = torch.randn(48, 40, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    rows, weight = pointwise_conv_operands(a, b)
    product = torch.nn.functional.conv3d(rows, weight).reshape(24, 48).t()
    assert torch.allclose(product, a @ b, rtol=1e-12, atol=1e-12)
    assert matmul_peak(torch.device("cpu"), torch.float32, 64, 1) > 0
