"""How a CPU job's large tensors get their memory: the one owner of the host allocator setting.

Why it matters: glibc serves every large allocation (above 128 KiB-32 MiB) with its own ``mmap``
and gives it back with ``munmap`` when freed, so each layer's output tensor is new memory that
the kernel must zero and map 4 KiB page by page on first touch. On this project's 2-core CPU a
whole-head forward pass at full width (176x240x160) spent 11 of its 30 CPU-seconds in the kernel
for that (2.8 M page faults). Three policies (:data:`POLICIES`):

- ``retain`` (``planar3d train`` on the CPU, and ``planar3d predict`` for a folder or an ensemble:
  ``pipelines.predict.cpu_memory_policy``): glibc's per-allocation
  ``mmap`` and heap trimming are turned off (``mallopt``), so freed tensors are reused without
  new faults. A full-width training step: 9.4-9.9 s against 11.5-13.4 s with ``huge-pages`` and
  16.0-17.8 s with ``default``. The 1 mm head at full width: second scan of a folder 10.9-11.2 s
  against 11.9-12.6 s with ``huge-pages``. The price is a higher and sticky resident size (peak
  8.1-8.4 GiB for that head against 6.2-6.3 GiB), which the memory planner counts
  (:func:`free_heap_bytes`: what the process holds free for reuse, which ``MemAvailable`` does
  not include).
- ``huge-pages`` (``planar3d predict`` of one scan with one model, where there is nothing to
  reuse; opt-in elsewhere, for hosts short of memory): glibc keeps its default, so memory goes back
  to the system when a tensor dies, and PyTorch asks for transparent huge pages on every
  allocation of 2 MiB or more (its ``THP_MEM_ALLOC_ENABLE``, set in this process before its first
  large allocation): a process predicting the 1 mm head twice took 0.19 M page faults against
  2.2-3.2 M with ``retain``. First scans were as fast as with ``retain`` (11.2-11.7 s against
  11.8-12.2 s) when the virtual machine's memory had been touched just
  before; on memory it had not touched for a while, either policy's first scan took up to 17-20 s
  (docs/prediction.md, "Huge pages, memory given back"). Needs the kernel's THP in ``always`` or
  ``madvise`` mode; where it is ``never``, or where PyTorch made a large allocation before (its
  setting is read once), ``retain`` holds instead and the record says why.
- ``default``: the allocator as it is.

Importing the library changes nothing; the jobs call :func:`configure_host_memory` once.
``PLANAR3D_HOST_MEMORY=huge-pages|retain|default`` in the environment overrides the job's choice
(``PLANAR3D_RETAIN_MEMORY=0``, the older switch, still means ``default``). Results do not depend
on it: the allocator changes where tensors live, never what is computed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: The host memory policies (the module docstring says what each does).
POLICIES = ("huge-pages", "retain", "default")
#: Environment override of the job's policy (one of :data:`POLICIES`).
ENVIRONMENT_VARIABLE = "PLANAR3D_HOST_MEMORY"
#: The older switch: ``0``/``false``/``no``/``off`` means ``default``.
LEGACY_VARIABLE = "PLANAR3D_RETAIN_MEMORY"
#: PyTorch's switch for transparent huge pages on CPU allocations of 2 MiB or more
#: (c10 ``alloc_cpu`` advises them ``MADV_HUGEPAGE``), read at its first such allocation. Child
#: processes inherit it from this process's environment, which only changes their page size.
TORCH_THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_HUGE_PAGE = 2 * 2**20
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_state: str | None = None


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle, or None on other C libraries (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33): all fields are ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes() -> int:
    """Bytes the process holds free in its malloc heap (glibc ``mallinfo2().fordblks``; 0 elsewhere)."""
    libc = _glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def transparent_huge_page_mode(path: str = _THP_MODE_FILE) -> str:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``); ``unknown`` where it cannot be read."""
    try:
        with open(path) as mode_file:
            text = mode_file.read()
    except OSError:
        return "unknown"
    start, stop = text.find("["), text.find("]")
    return text[start + 1:stop] if 0 <= start < stop else "unknown"


def _thp_eligible(address: int, smaps: str = "/proc/self/smaps") -> bool:
    """Whether the kernel may back ``address`` with transparent huge pages (its mapping's
    ``THPeligible`` in ``/proc/self/smaps``: 1 where madvised, or everywhere in ``always`` mode)."""
    inside = False
    try:
        with open(smaps) as maps:
            for line in maps:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:  # a mapping's first line: "start-stop perms ..."
                    low, _, high = head.partition("-")
                    inside = int(low, 16) <= address < int(high, 16)
                elif inside and line.startswith("THPeligible:"):
                    return line.split()[1] == "1"
    except (OSError, ValueError):
        return False
    return False


def _torch_allocates_huge_pages() -> bool:
    """Set PyTorch's switch, then check that a new large tensor lies in THP-eligible memory.

    PyTorch reads the switch once, at its first large allocation; a process that made one before
    keeps plain pages whatever the variable says, so the answer is read from the kernel.
    """
    import torch

    os.environ[TORCH_THP_VARIABLE] = "1"
    probe = torch.empty(2 * _HUGE_PAGE, dtype=torch.uint8)
    return _thp_eligible(probe.data_ptr() + _HUGE_PAGE)


def _requested_policy(preferred: str) -> tuple[str, str]:
    """(policy, why) from the environment, else ``preferred``."""
    override = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if override:
        if override not in POLICIES:
            from planar3d.errors import ConfigError

            raise ConfigError(f"{ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r}: "
                              f"expected one of {', '.join(POLICIES)}")
        return override, f"{ENVIRONMENT_VARIABLE}={override}"
    legacy = os.environ.get(LEGACY_VARIABLE, "").strip().lower()
    if legacy in ("0", "false", "no", "off"):
        return "default", f"{LEGACY_VARIABLE}={os.environ[LEGACY_VARIABLE]}"
    return preferred, ""


def _retain() -> bool:
    libc = _glibc()
    # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
    return libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1


def configure_host_memory(preferred: str) -> str:
    """Apply ``preferred`` (one of :data:`POLICIES`, or the environment's override) once per process.

    Returns what holds, for the run's record, e.g. ``"huge-pages"``, ``"retain"``,
    ``"default (PLANAR3D_HOST_MEMORY=default)"``, ``"retain (huge pages unavailable: THP mode never)"``,
    ``"default (retain unavailable: not glibc)"``. A later call returns the first one's answer:
    the allocator setting of a process is set once.
    """
    global _state
    if _state is not None:
        return _state
    if preferred not in POLICIES:
        raise ValueError(f"host memory policy must be one of {POLICIES}, got {preferred!r}")
    policy, why = _requested_policy(preferred)
    notes = [why] if why else []
    if policy == "huge-pages":
        mode = transparent_huge_page_mode()
        if platform.system() != "Linux" or mode not in ("always", "madvise"):
            notes.append(f"huge pages unavailable: THP mode {mode}")
            policy = "retain"
        elif not _torch_allocates_huge_pages():
            notes.append("huge pages unavailable: PyTorch made a large allocation before")
            policy = "retain"
    if policy == "retain" and not _retain():
        notes.append("retain unavailable: " + ("not glibc" if _glibc() is None else "mallopt refused"))
        policy = "default"
    _state = policy + (f" ({'; '.join(notes)})" if notes else "")
    return _state
