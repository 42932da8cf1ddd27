"""Batch summaries shared by several workers on one output folder: part files and their merge.

Every ``planar3d predict`` process (one shard of a Slurm array or Kubernetes indexed Job, or a
second process started on the same folder) writes its own *part summary* to
``OUT/.planar3d/parts/part<I>of<N>-p<pid>@<host>-<time>.json`` and then rewrites the folder
summary ``OUT/predictions.json`` merged from every part file there, under an exclusive lock, so
the last worker to finish leaves the complete record. :func:`merge_part_summaries` can also be
run on its own (``planar3d predict --merge-summaries -o OUT``).

For each scan the merged record is the newest record that says what happened to it
(``done``/``failed``/``skipped``; a ``skipped`` one is replaced by an older ``done`` record of the
same output, which has the lesion counts), else ``claimed`` (another worker held it when the
part was written), else ``pending`` (in ``expected`` but in no part yet).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from planar3d.claims import ScanClaims
from planar3d.io import host_name, write_json

STATE_FOLDER = ".planar3d"
SUMMARY_NAME = "predictions.json"
SUMMARY_FORMAT = "planar3d-predictions/1"
#: Statuses that say what happened to a scan, as opposed to "someone else has it".
FINAL_STATUSES = ("done", "failed", "skipped")


def parts_folder(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / STATE_FOLDER / "parts"


def claims_folder(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / STATE_FOLDER / "claims"


def part_file(out_dir: str | os.PathLike, num_parts: int = 1, part_id: int = 0) -> Path:
    """A new part-summary path for this process: no two workers (or reruns) share one."""
    name = f"part{part_id}of{num_parts}-p{os.getpid()}@{host_name()}-{time.time_ns()}.json"
    return parts_folder(out_dir) / name


def _read_parts(out_dir: Path) -> List[Dict[str, Any]]:
    parts = []
    for path in sorted(parts_folder(out_dir).glob("*.json")):
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # written atomically, so only a foreign file gets here
            continue
        if isinstance(part, dict) and part.get("format") == SUMMARY_FORMAT:
            parts.append(part)
    return sorted(parts, key=lambda part: part.get("finished", 0.0))


def _output_key(output: str, out_dir: Optional[str]) -> str:
    """The output's path relative to its output folder: workers may spell the folder differently
    (relative to another working directory, or through another mount point)."""
    if out_dir:
        try:
            return Path(output).relative_to(out_dir).as_posix()
        except ValueError:
            pass
    return output


def merged_scans(
    parts: Iterable[Dict[str, Any]],
    expected: Optional[Iterable[Dict[str, str]]] = None,
    out_dir: Optional[str | os.PathLike] = None,
) -> List[Dict[str, Any]]:
    """One record per output path, chosen as the module docstring says, sorted by input.

    Args:
        parts: part summaries, oldest first.
        expected: ``{"input": ..., "output": ...}`` of every scan of the batch; when given, only
            these appear, missing ones as ``pending``.
        out_dir: the output folder as ``expected`` spells it (outputs are matched relative to it).
    """
    newest: Dict[str, Dict[str, Any]] = {}
    newest_done: Dict[str, Dict[str, Any]] = {}
    claimed: Dict[str, Dict[str, Any]] = {}
    for part in parts:
        for scan in part.get("scans", []):
            output = _output_key(scan.get("output") or "", part.get("out_dir"))
            if scan.get("status") in FINAL_STATUSES:
                newest[output] = scan
                if scan["status"] == "done":
                    newest_done[output] = scan
            else:
                claimed[output] = scan
    chosen: Dict[str, Dict[str, Any]] = {}
    for output in set(newest) | set(claimed):
        scan = newest.get(output) or claimed[output]
        if scan.get("status") == "skipped" and output in newest_done:
            scan = newest_done[output]
        chosen[output] = scan
    if expected is not None:
        base = None if out_dir is None else str(out_dir)
        chosen = {
            scan["output"]: chosen.get(_output_key(scan["output"], base)) or {**scan, "status": "pending", "error": None}
            for scan in expected
        }
    return sorted(chosen.values(), key=lambda scan: (scan.get("input") or "", scan.get("output") or ""))


def merge_part_summaries(
    out_dir: str | os.PathLike,
    expected: Optional[Iterable[Dict[str, str]]] = None,
    extra: Optional[Dict[str, Any]] = None,
    lock_timeout: float = 60.0,
) -> Path:
    """Rewrite ``OUT/predictions.json`` from every part summary, atomically and under a lock.

    Args:
        out_dir: the shared output folder.
        expected: the batch's scans (see :func:`merged_scans`); None: every scan of any part.
        extra: more top-level entries (e.g. ``settings``).
        lock_timeout: seconds to wait for another worker's merge before giving up.

    Returns:
        The merged summary's path.

    Raises:
        TimeoutError: the lock stayed held by a live worker for ``lock_timeout`` seconds.
    """
    out_dir = Path(out_dir)
    locks = ScanClaims(out_dir / STATE_FOLDER / "locks", stale_after=lock_timeout)
    deadline = time.monotonic() + lock_timeout
    while not locks.acquire(SUMMARY_NAME):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{out_dir / SUMMARY_NAME}: merge lock held by {locks.holder(SUMMARY_NAME)}")
        time.sleep(0.05)
    try:
        scans = merged_scans(_read_parts(out_dir), expected, out_dir)
        counts: Dict[str, int] = {}
        for scan in scans:
            counts[scan["status"]] = counts.get(scan["status"], 0) + 1
        path = out_dir / SUMMARY_NAME
        write_json(path, {
            "format": SUMMARY_FORMAT,
            "out_dir": str(out_dir),
            "merged_from": len(list(parts_folder(out_dir).glob("*.json"))),
            **(extra or {}),
            # claimed (still with another worker) and pending (no worker yet) only when there are some
            "counts": {status: counts.get(status, 0) for status in ("done", "skipped", "failed", "claimed", "pending")
                       if status in FINAL_STATUSES or counts.get(status)},
            "scans": scans,
        })
        return path
    finally:
        locks.release(SUMMARY_NAME)
