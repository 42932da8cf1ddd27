"""Read-ahead and write-behind: order, bounds, and per-item errors."""

import doctest
import threading

import pytest

from planar3d import pipelining
from planar3d.pipelining import ReadAhead, WriteBehind, pipeline_workers


def test_read_ahead_keeps_order_bounds_the_lead_and_reports_errors_per_item():
    started = []
    lock = threading.Lock()

    def work(item):
        with lock:
            started.append(item)
        if item == 2:
            raise ValueError("bad item 2")
        return item * 10

    pulled = []

    def items():  # lazily consumed: a claiming generator must not run far ahead
        for item in range(6):
            pulled.append(item)
            yield item

    results = []
    with ReadAhead(work, items(), workers=2, depth=2) as reads:
        for position, (item, future) in enumerate(reads):
            assert item == position
            # never more than `depth` items taken past the one being consumed
            assert len(pulled) <= position + 1 + 2
            try:
                results.append(future.result())
            except ValueError as error:
                results.append(str(error))
    assert results == [0, 10, "bad item 2", 30, 40, 50]
    assert sorted(started) == list(range(6))


def test_write_behind_reports_in_order_and_bounds_pending():
    reported = []
    with WriteBehind(lambda key, future: reported.append((key, future.exception() is None)), workers=2, max_pending=1) as writes:
        for i in range(5):
            writes.submit((i,), (lambda v: 1 / v), i)  # i = 0 fails
            assert len(writes.pending) <= 1
    assert reported == [(0, False), (1, True), (2, True), (3, True), (4, True)]
    with pytest.raises(ValueError):
        WriteBehind(print, workers=0)


def test_pipeline_workers_use_idle_host_cores_only_when_an_accelerator_computes():
    assert doctest.testmod(pipelining).failed == 0
    assert pipeline_workers("cpu", 64) == 2                       # the model uses every core
    assert [pipeline_workers("cuda", n) for n in (1, 2, 8, 12, 16, 128)] == [2, 2, 2, 3, 4, 4]
    assert pipeline_workers("cuda") >= 2                          # this machine's cores
