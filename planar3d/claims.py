"""Per-item claims that let several processes share one output folder without duplicate work.

A worker that wants to process an item creates ``<folder>/<key>.claim`` atomically, with its
record (process id, host, start time) already in it: written to a draft, then hard-linked to the
claim's name (``link`` fails if the name exists; atomic on local disks and on NFS/Lustre/GPFS),
or by exclusive create (``O_CREAT | O_EXCL``) where a disk has no hard links. Whoever creates it
owns the item; any other worker skips it.
The owner removes the claim when the item is finished (its outputs are then on disk).

A claim is *stale*, and may be taken over, when its owner is a process on this machine that no
longer exists (killed, crashed), or when it is older than ``stale_after`` seconds (an owner on
another machine, whose liveness cannot be probed). Taking over renames the stale file to a name
of one's own first, so that of two workers seeing the same stale claim only one wins.

Example:
    >>> claims = ScanClaims("out/.planar3d/claims")              # doctest: +SKIP
    >>> if claims.acquire("sub-01/flair_mask.nii.gz"):           # doctest: +SKIP
    ...     work(); claims.release("sub-01/flair_mask.nii.gz")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional

from planar3d.io import host_name, process_alive

#: Default age (seconds) after which a claim by a process on another machine is considered stale.
STALE_AFTER_SECONDS = 6 * 3600.0


def claim_name(key: str) -> str:
    """File name of the claim on ``key``: readable, case-folded, and unique per key.

    Case-folded so that keys differing only in case (one file on a case-insensitive disk) share
    a claim; the hash keeps two keys that sanitise alike apart.

    Example:
        >>> claim_name("sub-01/Flair_mask.nii.gz")
        'sub-01_flair_mask.nii.gz.8154653c2399.claim'
        >>> claim_name("sub-01/Flair_mask.nii.gz") == claim_name("sub-01/flair_mask.nii.gz")
        True
    """
    folded = key.casefold()
    readable = re.sub(r"[^a-z0-9._-]", "_", folded)[-80:]
    return f"{readable}.{hashlib.sha256(folded.encode()).hexdigest()[:12]}.claim"


class ScanClaims:
    """Exclusive claims on items (scans) in one folder, shared by processes and machines.

    Args:
        folder: where the claim files live (created if missing); on the shared output folder.
        stale_after: seconds after which a claim from another machine may be taken over.
    """

    def __init__(self, folder: str | os.PathLike, stale_after: float = STALE_AFTER_SECONDS):
        self.folder = Path(folder)
        self.stale_after = float(stale_after)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owner = {"pid": os.getpid(), "host": host_name(), "started": time.time()}

    def path(self, key: str) -> Path:
        return self.folder / claim_name(key)

    def _create(self, path: Path, key: str) -> bool:
        """Create the claim with its whole record, or return False if it exists.

        The record is written to a file of this process's own first and hard-linked to the claim's
        name (``link`` is atomic and fails if the name exists, on NFS too), so a claim is never
        seen without its record: an exclusively created claim file that its writer was killed
        before filling reads as nobody's, and was kept for ``stale_after`` (6 h) as if from
        another machine. Where the disk has no hard links, exclusive create is the fallback.
        """
        text = json.dumps({**self.owner, "key": key, "time": time.time()}, allow_nan=False) + "\n"
        draft = path.with_name(f".{path.name}.p{self.owner['pid']}@{self.owner['host']}.new")
        try:
            draft.write_text(text, encoding="utf-8")
            try:
                os.link(draft, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links on this disk
                pass
        finally:
            draft.unlink(missing_ok=True)
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        return True

    @staticmethod
    def read(path: Path) -> Optional[Dict[str, Any]]:
        """The claim's record, ``{}`` for an unreadable (half-written) one, None if gone."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def is_stale(self, path: Path) -> bool:
        """True when the claim at ``path`` may be taken over (see the module docstring)."""
        record = self.read(path)
        if record is None:
            return False
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if record.get("host") == self.owner["host"] and isinstance(record.get("pid"), int):
            if record["pid"] == os.getpid():
                return False
            return not process_alive(record["pid"])
        # another machine's claim, or one whose writer died mid-write: only age tells
        return age > self.stale_after

    def acquire(self, key: str) -> bool:
        """Claim ``key``; True when this process now owns it (also when it already did)."""
        path = self.path(key)
        if self._create(path, key):
            return True
        record = self.read(path)
        if record and record.get("pid") == os.getpid() and record.get("host") == self.owner["host"]:
            return True
        if not self.is_stale(path):
            return False
        taken = path.with_name(f"{path.name}.stale.p{os.getpid()}@{self.owner['host']}")
        try:
            os.rename(path, taken)  # only one of several workers gets the stale file
        except FileNotFoundError:
            return self._create(path, key)
        if not self.is_stale(taken):  # someone replaced it between our check and the rename
            try:
                os.link(taken, path)  # put the live claim back (fails if a new one exists)
            except OSError:
                pass
            taken.unlink(missing_ok=True)
            return False
        taken.unlink(missing_ok=True)
        return self._create(path, key)

    def release(self, key: str) -> None:
        """Remove this process's claim on ``key`` (a claim by someone else is left alone)."""
        path = self.path(key)
        record = self.read(path)
        if record is not None and record.get("pid") == os.getpid() and record.get("host") == self.owner["host"]:
            path.unlink(missing_ok=True)

    def holder(self, key: str) -> Optional[str]:
        """``"pid@host"`` of the current owner of ``key``, or None when unclaimed."""
        record = self.read(self.path(key))
        if record is None:
            return None
        return f"{record.get('pid', '?')}@{record.get('host', '?')}"
