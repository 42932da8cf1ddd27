"""planar3d.host_memory: freed memory is reused (no fresh page faults), and the switch turns it off.

Each case runs in its own interpreter: mallopt changes the whole process, and the fault count
must not include pytest's own allocations.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Faults of a 256 MiB tensor (65536 pages of 4 KiB) made after ten of the same size were made and
# freed: glibc's aligned allocations need a few rounds before freed blocks coalesce into a fit
# (the heap then stops growing). Torch, not numpy: numpy asks for transparent huge pages, which
# hides the count (not the cost).
_PROBE = """
import json, resource, torch
from planar3d.host_memory import free_heap_bytes, retain_freed_memory
state = retain_freed_memory()
assert retain_freed_memory() == state  # once per process
for _ in range(10):
    a = torch.ones(64 * 2**20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = torch.ones(64 * 2**20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
del b
print(json.dumps({"state": state, "faults": faults, "free_heap": free_heap_bytes()}))
"""


def _probe(**environment):
    env = {k: v for k, v in os.environ.items() if k != "PLANAR3D_RETAIN_MEMORY"}
    env.update(PYTHONPATH=str(ROOT), **environment)
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_freed_memory_is_reused_without_new_page_faults():
    result = _probe()
    assert result["state"] == "retained"
    assert result["faults"] < 65536 // 10, result
    assert result["free_heap"] >= 256 * 2**20, result  # the freed tensor, kept for reuse and counted


@glibc
def test_the_environment_switch_leaves_glibc_to_map_fresh_pages():
    result = _probe(PLANAR3D_RETAIN_MEMORY="0")
    assert result["state"] == "off (PLANAR3D_RETAIN_MEMORY=0)"
    assert result["faults"] > 65536 // 2, result  # glibc's default: munmap on free, fresh pages on reuse
    assert result["free_heap"] < 64 * 2**20, result  # given back to the system


def test_cpu_memory_budget_counts_the_free_memory_the_process_keeps(monkeypatch):
    import planar3d.inference as inference

    monkeypatch.setattr(inference, "free_heap_bytes", lambda: 0)
    without = inference.memory_budget_bytes("cpu")
    monkeypatch.setattr(inference, "free_heap_bytes", lambda: 10 * 2**30)
    with_kept = inference.memory_budget_bytes("cpu")
    # MemAvailable is read twice and may move a little between the reads
    assert abs((with_kept - without) - inference.MEMORY_FRACTION * 10 * 2**30) < 512 * 2**20
