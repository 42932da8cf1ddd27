"""Keep freed CPU memory inside the process, so a new tensor does not fault in fresh pages.

Why: glibc serves every large allocation (above 128 KiB-32 MiB) with its own ``mmap`` and gives
it back with ``munmap`` when freed, so each layer's output tensor is new memory that the kernel
must zero and map page by page on first touch. On this project's 2-core CPU a whole-head forward
pass at full width (176x240x160) spent 11 of its 30 CPU-seconds in the kernel for that
(2.8 M page faults); MONAI DynUNet's 128³ windows spent 4 of 11. With mmap disabled and the
heap never trimmed, freed tensors are reused: a second head pass in the same process took
10.2-11.8 s instead of 16.8 s (0.2 M faults; the first pass must fault in its peak either way and
took 14.5-19.4 s against 16.0-16.8 s), and a full-width training step 9.9 s instead of 16.1 s.
The price is a higher and sticky resident size (peak 7.8-8.9 GiB instead of 5.8-6.2 GiB for
the head, within the 10.1 GB that :data:`planar3d.inference.FORWARD_BYTES_PER_VOXEL` plans), so
only the prediction and training jobs turn it on when they run on the CPU
(:func:`pipelines.predict.predict_folder`, :func:`pipelines.train.train`); importing the library
changes nothing.

Memory planning must count that kept memory: :func:`free_heap_bytes` is what the process holds
free for reuse, which ``MemAvailable`` does not include (:func:`planar3d.inference.memory_budget_bytes`
adds it, or a folder's second scan would be cut into slabs for want of memory the process has).

``PLANAR3D_RETAIN_MEMORY=0`` in the environment leaves the allocator as it is. Results do not
depend on it: the allocator changes where tensors live, never what is computed.
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
#: Environment switch; ``0``/``false``/``no``/``off`` leaves the allocator alone.
ENVIRONMENT_VARIABLE = "PLANAR3D_RETAIN_MEMORY"
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


def retain_freed_memory() -> str:
    """Turn off glibc's per-allocation ``mmap`` and heap trimming for this process (once).

    Returns what holds now, for the run's record: ``"retained"`` (set, here or before),
    ``"off (PLANAR3D_RETAIN_MEMORY=…)"`` or ``"unchanged (not glibc)"`` /
    ``"unchanged (mallopt refused)"``.
    """
    global _state
    if _state is not None:
        return _state
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        _state = f"off ({ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]})"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "unchanged (not glibc)"
        return _state
    # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _state = "retained" if ok else "unchanged (mallopt refused)"
    return _state
