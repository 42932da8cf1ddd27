"""A static quality-control page: ``qc/index.html``, one row per scan, readable from the disk.

The page needs no server, no script and nothing from the network: a table with each scan's
montage (a relative link to its PNG), lesion count and volume, processing time and warnings. Every
name is HTML-escaped and every link percent-encoded, so file names holding ``<``, ``&`` or a
newline show as they are. :func:`scan_warnings` computes the warnings from simple statistics.

Example:
    >>> rows = [QCRow("sub-01_FLAIR.nii.gz", "qc/sub-01_FLAIR.png", 3, 1.25, 4.2,
    ...               scan_warnings(flair, mask))]                         # doctest: +SKIP
    >>> write_qc_page("out", rows)                                         # doctest: +SKIP
    PosixPath('out/qc/index.html')
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence
from urllib.parse import quote

import numpy as np

from planar3d.io import atomic_write_text

QC_DIR = "qc"
PAGE_NAME = "index.html"
#: Lesion load above this fraction of the head is suspicious (a failed scan, not MS).
MAX_LESION_FRACTION_OF_HEAD = 0.10
#: Fewer distinct intensity levels than this: a binary/label image or a badly scaled scan.
MIN_INTENSITY_LEVELS = 16
#: Head voxels: above this fraction of the 99th intensity percentile (used without a head mask).
HEAD_THRESHOLD_OF_P99 = 0.1
#: At most this many voxels are sampled (regular stride) for the level count.
LEVEL_SAMPLE = 1_000_000


@dataclass
class QCRow:
    """One scan on the page.

    Attributes:
        scan: the scan's name (shown escaped).
        montage: its PNG, absolute or relative to the output folder; None when there is none.
        lesion_count: lesions in the mask.
        lesion_volume_ml: their total volume.
        seconds: processing time (nan when unknown).
        warnings: one line each (see :func:`scan_warnings`).
    """

    scan: str
    montage: Optional[str | os.PathLike] = None
    lesion_count: int = 0
    lesion_volume_ml: float = 0.0
    seconds: float = math.nan
    warnings: List[str] = field(default_factory=list)


def scan_warnings(image: np.ndarray, mask: Optional[np.ndarray] = None, head_mask: Optional[np.ndarray] = None) -> List[str]:
    """Warnings about one scan from its intensities and its lesion mask (empty list: nothing odd).

    Checks: non-finite voxels; an all-zero or constant image; fewer than
    :data:`MIN_INTENSITY_LEVELS` distinct intensities; no lesion found; lesions over
    :data:`MAX_LESION_FRACTION_OF_HEAD` of the head (``head_mask``, else voxels above
    :data:`HEAD_THRESHOLD_OF_P99` of the 99th percentile).

    Examples:
        >>> scan_warnings(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
        ['image is all zero', 'no lesion found']
        >>> image = np.arange(64.0).reshape(4, 4, 4); mask = image > 40    # head: 57 voxels > 6.2
        >>> scan_warnings(image, mask)
        ['lesion load 40% of the head (over 10%)']
    """
    image = np.asarray(image)
    warnings: List[str] = []
    finite = np.isfinite(image)
    n_bad = image.size - int(np.count_nonzero(finite))
    if n_bad:
        warnings.append(f"{n_bad} non-finite voxels (NaN or infinite)")
    values = image[finite]
    if values.size == 0:
        warnings.append("no finite intensity at all")
    elif not values.any():
        warnings.append("image is all zero")
    elif values.min() == values.max():
        warnings.append(f"constant intensity ({values.min():g})")
    else:
        step = max(1, values.size // LEVEL_SAMPLE)
        levels = np.unique(values[::step]).size
        if levels < MIN_INTENSITY_LEVELS:
            warnings.append(f"suspicious intensity range: only {levels} distinct values (a mask or label image?)")
    if mask is not None:
        lesion = np.asarray(mask) != 0
        n_lesion = int(np.count_nonzero(lesion))
        if n_lesion == 0:
            warnings.append("no lesion found")
        else:
            if head_mask is not None:
                head = int(np.count_nonzero(head_mask))
            elif values.size and values.max() > values.min():
                threshold = HEAD_THRESHOLD_OF_P99 * float(np.percentile(values, 99))
                head = int(np.count_nonzero(finite & (np.where(finite, image, 0) > threshold)))
            else:
                head = 0
            if head == 0 or n_lesion > MAX_LESION_FRACTION_OF_HEAD * head:
                share = f"{100.0 * n_lesion / head:.0f}%" if head else "all"
                warnings.append(f"lesion load {share} of the head (over {100 * MAX_LESION_FRACTION_OF_HEAD:.0f}%)")
    return warnings


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #111; }
table { border-collapse: collapse; }
th, td { border: 1px solid #bbb; padding: 0.4em 0.6em; vertical-align: top; text-align: left; }
th { background: #eee; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.warn td { background: #fff4e0; }
td.name { font-family: monospace; white-space: pre-wrap; overflow-wrap: anywhere; max-width: 18em; }
img { max-width: 640px; height: auto; display: block; }
ul { margin: 0; padding-left: 1.2em; }
"""


def _number(value: float, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _link(montage: str | os.PathLike, out_dir: Path) -> str:
    """Percent-encoded link from ``qc/`` to the montage (relative, so the folder can move)."""
    target = Path(montage) if Path(montage).is_absolute() else out_dir / montage
    relative = os.path.relpath(target, out_dir / QC_DIR)
    return quote(Path(relative).as_posix())


def render_qc_page(out_dir: str | os.PathLike, rows: Sequence[QCRow], title: str = "planar3d QC") -> str:
    """The HTML text of the page (see :func:`write_qc_page`)."""
    out = Path(out_dir)
    escape = html.escape
    n_warn = sum(1 for row in rows if row.warnings)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="summary">{len(rows)} scans, {sum(r.lesion_count for r in rows)} lesions, '
        f"{n_warn} with warnings.</p>",
        "<table>",
        "<thead><tr><th>scan</th><th>montage</th><th>lesions</th><th>volume (mL)</th><th>time (s)</th>"
        "<th>warnings</th></tr></thead>",
        "<tbody>",
    ]
    for row in rows:
        name = escape(row.scan, quote=True)
        if row.montage is not None:
            href = escape(_link(row.montage, out), quote=True)
            montage = f'<a href="{href}"><img src="{href}" alt="montage of {name}"></a>'
        else:
            montage = "(no montage)"
        warnings = "<ul>" + "".join(f"<li>{escape(text)}</li>" for text in row.warnings) + "</ul>" if row.warnings else ""
        parts.append(
            f'<tr class="{"warn" if row.warnings else "ok"}">'
            f'<td class="name">{name}</td><td>{montage}</td>'
            f'<td class="number">{int(row.lesion_count)}</td>'
            f'<td class="number">{_number(row.lesion_volume_ml, 3)}</td>'
            f'<td class="number">{_number(row.seconds, 1)}</td>'
            f"<td>{warnings}</td></tr>"
        )
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(parts)


def write_qc_page(out_dir: str | os.PathLike, rows: Sequence[QCRow], title: str = "planar3d QC") -> Path:
    """Write ``out_dir/qc/index.html`` atomically (``qc/`` created) and return its path.

    Args:
        out_dir: the prediction output folder; montage paths are relative to it (or absolute).
        rows: one :class:`QCRow` per scan, shown in this order.
        title: the page's title and heading.
    """
    path = Path(out_dir) / QC_DIR / PAGE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_qc_page(out_dir, rows, title))
    return path
