"""planar3d.host_memory: the three policies do what they say, the environment overrides them,
and a process that cannot have huge pages says so and retains memory instead.

Each case runs in its own interpreter: the allocator setting is per process, PyTorch reads its
huge-page switch once, and the fault count must not include pytest's own allocations.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from planar3d.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Faults of a 256 MiB tensor (65536 pages of 4 KiB) made after ten of the same size were made and
# freed: glibc's aligned allocations need a few rounds before freed blocks coalesce into a fit
# (the heap then stops growing). Torch, not numpy: numpy asks for transparent huge pages itself.
_PROBE = """
import json, resource, sys, torch
from planar3d.host_memory import configure_host_memory, free_heap_bytes
if sys.argv[2] == "allocate-first":
    early = torch.ones(4 * 2**20)  # PyTorch reads its huge-page switch here, before the policy
state = configure_host_memory(sys.argv[1])
assert configure_host_memory("default") == state  # once per process
for _ in range(10):
    a = torch.ones(64 * 2**20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = torch.ones(64 * 2**20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
del b
print(json.dumps({"state": state, "faults": faults, "free_heap": free_heap_bytes()}))
"""


def _probe(policy, first="", **environment):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PLANAR3D_RETAIN_MEMORY", "PLANAR3D_HOST_MEMORY", "THP_MEM_ALLOC_ENABLE")}
    env.update(PYTHONPATH=str(ROOT), **environment)
    done = subprocess.run([sys.executable, "-c", _PROBE, policy, first], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _thp_mode():
    from planar3d.host_memory import transparent_huge_page_mode

    return transparent_huge_page_mode()


huge_pages = pytest.mark.skipif(platform.system() != "Linux" or _thp_mode() not in ("always", "madvise"),
                                reason="the kernel's transparent huge pages are off")


@glibc
def test_retain_reuses_freed_memory_without_new_page_faults():
    result = _probe("retain")
    assert result["state"] == "retain"
    assert result["faults"] < 65536 // 10, result
    assert result["free_heap"] >= 256 * 2**20, result  # the freed tensor, kept for reuse and counted


@glibc
def test_default_leaves_glibc_to_map_fresh_pages():
    result = _probe("default")
    assert result["state"] == "default"
    assert result["faults"] > 65536 // 2, result  # glibc's default: munmap on free, fresh pages on reuse
    assert result["free_heap"] < 64 * 2**20, result  # given back to the system


@huge_pages
@glibc
def test_huge_pages_fault_a_fresh_tensor_in_2_mib_at_a_time_and_give_memory_back():
    result = _probe("huge-pages")
    assert result["state"] == "huge-pages"
    # 128 huge pages, where 4 KiB pages would take 65536 faults; the kernel may fall back to small
    # pages for a few when it has no free 2 MiB block at hand
    assert result["faults"] < 65536 // 10, result
    assert result["free_heap"] < 64 * 2**20, result  # glibc's default: freed tensors go back


@glibc
def test_huge_pages_after_pytorch_read_its_switch_fall_back_to_retain_and_say_why():
    result = _probe("huge-pages", "allocate-first")
    if _thp_mode() == "always":  # every mapping is eligible: huge pages hold anyway
        assert result["state"] == "huge-pages"
        return
    assert result["state"] == "retain (huge pages unavailable: PyTorch made a large allocation before)", result
    # retain holds: freed tensors stay in the process (how soon they are reused without a fault
    # depends on the heap's fragmentation, which the early tensor changes)
    assert result["free_heap"] >= 256 * 2**20, result


@glibc
@pytest.mark.parametrize("environment, state", [
    ({"PLANAR3D_HOST_MEMORY": "default"}, "default (PLANAR3D_HOST_MEMORY=default)"),
    ({"PLANAR3D_HOST_MEMORY": "RETAIN"}, "retain (PLANAR3D_HOST_MEMORY=retain)"),
    ({"PLANAR3D_RETAIN_MEMORY": "0"}, "default (PLANAR3D_RETAIN_MEMORY=0)"),  # the older switch
])
def test_the_environment_overrides_the_jobs_policy(environment, state):
    assert _probe("huge-pages", **environment)["state"] == state


def test_an_unknown_policy_in_the_environment_is_a_config_error(monkeypatch):
    import planar3d.host_memory as host_memory

    monkeypatch.setenv("PLANAR3D_HOST_MEMORY", "hugepages")
    monkeypatch.setattr(host_memory, "_state", None)  # this process's setting is left untouched
    with pytest.raises(ConfigError, match="PLANAR3D_HOST_MEMORY='hugepages': expected one of huge-pages, retain, default"):
        host_memory.configure_host_memory("retain")
    assert host_memory._state is None
    with pytest.raises(ValueError, match="host memory policy"):
        host_memory.configure_host_memory("retained")


def test_thp_mode_and_eligibility_are_read_from_the_kernels_files(tmp_path):
    from planar3d.host_memory import _thp_eligible, transparent_huge_page_mode

    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert transparent_huge_page_mode(str(mode)) == "madvise"
    mode.write_text("[never]\n")
    assert transparent_huge_page_mode(str(mode)) == "never"
    assert transparent_huge_page_mode(str(tmp_path / "missing")) == "unknown"
    smaps = tmp_path / "smaps"
    smaps.write_text("1000-3000 rw-p 00000000 00:00 0\nSize: 8 kB\nTHPeligible:    0\n"
                     "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nSize: 4096 kB\nTHPeligible:    1\n")
    assert _thp_eligible(0x7F0000200000, str(smaps)) is True
    assert _thp_eligible(0x2000, str(smaps)) is False
    assert _thp_eligible(0x5000, str(smaps)) is False  # in no mapping
    assert _thp_eligible(0x2000, str(tmp_path / "missing")) is False


def test_cpu_memory_budget_counts_the_free_memory_the_process_keeps(monkeypatch):
    import planar3d.inference as inference

    monkeypatch.setattr(inference, "free_heap_bytes", lambda: 0)
    without = inference.memory_budget_bytes("cpu")
    monkeypatch.setattr(inference, "free_heap_bytes", lambda: 10 * 2**30)
    with_kept = inference.memory_budget_bytes("cpu")
    # MemAvailable is read twice and may move a little between the reads
    assert abs((with_kept - without) - inference.MEMORY_FRACTION * 10 * 2**30) < 512 * 2**20


def test_predict_asks_for_huge_pages_for_one_scan_and_one_model_and_retains_memory_otherwise():
    from pipelines.predict import cpu_memory_policy

    assert cpu_memory_policy(1) == cpu_memory_policy(1, 1) == "huge-pages"
    assert cpu_memory_policy(2) == cpu_memory_policy(1, 3) == cpu_memory_policy(40, 5) == "retain"


_PREDICT = """
import json, sys
from pathlib import Path
import nibabel as nib, numpy as np, torch
from planar3d.checkpoint import ModelCheckpoint
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from pipelines.predict import predict_folder
work = Path(sys.argv[1]); scans = work / "scans"
if sys.argv[2] == "setup":  # in a process of its own: building a model allocates before predict would
    scans.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((24, 24, 16)).astype(np.float32) * 100, np.eye(4)),
                 scans / f"s{i}.nii.gz")
    config = PlanarResUNetConfig(width=0.0625)
    ModelCheckpoint(PlanarResUNet(config).state_dict(), config).save(work / "best.pt")
else:
    inputs = scans if sys.argv[2] == "2" else scans / "s0.nii.gz"
    summary = predict_folder(inputs, work / sys.argv[2], work / "best.pt", progress=False)
    print(json.dumps(summary.provenance["settings"]["host_memory"]))
"""


@pytest.mark.slow
@glibc
def test_predict_records_the_policy_it_ran_under(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PLANAR3D_RETAIN_MEMORY", "PLANAR3D_HOST_MEMORY", "THP_MEM_ALLOC_ENABLE")}
    env.update(PYTHONPATH=str(ROOT))
    states = {}
    for step in ("setup", "1", "2"):
        done = subprocess.run([sys.executable, "-c", _PREDICT, str(tmp_path), step], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        states[step] = done.stdout.strip().splitlines()[-1] if step != "setup" else None
    assert json.loads(states["2"]) == "retain"  # a folder of two
    if _thp_mode() in ("always", "madvise"):
        assert json.loads(states["1"]) == "huge-pages"  # one scan: nothing to reuse
    else:
        assert json.loads(states["1"]).startswith("retain (huge pages unavailable")
