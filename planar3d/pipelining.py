"""Read-ahead and write-behind for batch work: decode the next inputs and encode finished
outputs in worker threads while the caller computes.

``.nii.gz`` decoding and encoding is zlib work, which releases the GIL while it inflates or
deflates a buffer, so threads overlap it with each other and with torch (which also runs
outside the GIL); the amount of work held in flight is bounded so memory stays bounded.
Measured on the real scans: ``docs/prediction.md``.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Generic, Iterable, Iterator, Optional, Tuple, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Threads decoding inputs and how many inputs may be decoded ahead of the one being computed.
READ_WORKERS = 2
READ_AHEAD = 2
#: Threads encoding outputs and how many finished items may wait to be written.
WRITE_WORKERS = 2
WRITE_BEHIND = 2
#: The most threads :func:`pipeline_workers` gives each side when an accelerator computes.
MAX_ACCELERATOR_WORKERS = 4


def pipeline_workers(device_type: str, cpu_count: Optional[int] = None) -> int:
    """Threads (and items in flight) for each of read-ahead and write-behind.

    On the CPU the model already uses every core, so 2 each (:data:`READ_WORKERS`). When a GPU
    computes, a scan's model step takes a fraction of its read, preprocessing, post-processing
    and write (issue 10, H100: 1.8 scans/s with 2 each), so the host's idle cores take them:
    a quarter of the cores each side, 2 to :data:`MAX_ACCELERATOR_WORKERS` (memory stays bounded:
    at most that many scans in flight each side).

    Example:
        >>> pipeline_workers("cpu", 16), pipeline_workers("cuda", 16), pipeline_workers("cuda", 6), pipeline_workers("cuda", 64)
        (2, 4, 2, 4)
    """
    if device_type == "cpu":
        return READ_WORKERS
    if cpu_count is None:  # the cores this process may use (a container's or Slurm's share), where the OS says
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(READ_WORKERS, min(MAX_ACCELERATOR_WORKERS, cpu_count // 4))


class ReadAhead(Generic[Item, Result]):
    """``function(item)`` for every item, in order, at most ``depth`` items ahead of the consumer.

    Iterating yields ``(item, future)`` pairs in order; ``future.result()`` raises what
    ``function`` raised for that item (the others go on). ``items`` is consumed lazily, from the
    consumer's thread, only as far as the read-ahead reaches: a generator that claims work (see
    :mod:`planar3d.claims`) claims at most ``depth + 1`` items ahead.

    Example:
        >>> with ReadAhead(lambda x: x * x, [1, 2, 3]) as squares:
        ...     [(item, future.result()) for item, future in squares]
        [(1, 1), (2, 4), (3, 9)]
    """

    def __init__(self, function: Callable[[Item], Result], items: Iterable[Item], workers: int = READ_WORKERS,
                 depth: int = READ_AHEAD, name: str = "planar3d-read"):
        if workers < 1 or depth < 1:
            raise ValueError(f"need workers >= 1 and depth >= 1, got {workers}, {depth}")
        self.function = function
        self.items: Iterator[Item] = iter(items)
        self.exhausted = False
        self.depth = depth
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.submitted: Deque[Tuple[Item, Future]] = deque()

    def _fill(self, limit: int) -> None:
        while not self.exhausted and len(self.submitted) < limit:
            try:
                item = next(self.items)
            except StopIteration:
                self.exhausted = True
                return
            self.submitted.append((item, self.pool.submit(self.function, item)))

    def start(self) -> None:
        """Submit the first items now (iterating does it too)."""
        self._fill(self.depth + 1)

    def __iter__(self) -> Iterator[Tuple[Item, "Future[Result]"]]:
        self._fill(self.depth + 1)
        while self.submitted:
            current = self.submitted.popleft()
            self._fill(self.depth)  # the consumer works on `current` while `depth` more are decoded
            yield current

    def close(self) -> None:
        for _, future in self.submitted:
            future.cancel()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> "ReadAhead[Item, Result]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WriteBehind:
    """Runs jobs in worker threads; once more than ``max_pending`` are unfinished, waits for the
    oldest. ``on_done(*key, future)`` is called for every job, in submission order, from the
    caller's thread (so it may update shared state without locks).

    Example:
        >>> done = []
        >>> with WriteBehind(lambda key, future: done.append((key, future.result()))) as writes:
        ...     for i in range(3):
        ...         writes.submit((i,), pow, i, 2)
        >>> done
        [(0, 0), (1, 1), (2, 4)]
    """

    def __init__(self, on_done: Callable[..., None], workers: int = WRITE_WORKERS, max_pending: int = WRITE_BEHIND,
                 name: str = "planar3d-write"):
        if workers < 1 or max_pending < 0:
            raise ValueError(f"need workers >= 1 and max_pending >= 0, got {workers}, {max_pending}")
        self.on_done = on_done
        self.max_pending = max_pending
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.pending: Deque[Tuple[Tuple[Any, ...], Future]] = deque()

    def submit(self, key: Tuple[Any, ...], function: Callable[..., Any], *args: Any) -> None:
        self.pending.append((tuple(key), self.pool.submit(function, *args)))
        while len(self.pending) > self.max_pending:
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        key, future = self.pending.popleft()
        future.exception()  # wait
        self.on_done(*key, future)

    def drain(self) -> None:
        """Wait for every job and report it."""
        while self.pending:
            self._collect_oldest()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.pool.shutdown(wait=True)
