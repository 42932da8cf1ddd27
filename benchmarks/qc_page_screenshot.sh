#!/usr/bin/env bash
# Render a generated QC page in real headless Chromium and save a screenshot.
#   bash benchmarks/qc_page_screenshot.sh [OUT_DIR] [PNG]      (defaults: a temp folder, /tmp/qc.png)
# The page holds three synthetic scans: one with lesions, one lesion-free, one constant image
# whose name holds '<', '&' and a newline. Chromium runs with no network and a throw-away profile,
# from the page's file:// URL (no server). Needs the `chromium` binary (Debian: apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
png=${2:-/tmp/qc.png}
python=${PYTHON:-python}
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$python" - "$out" <<'PY'
import sys
from pathlib import Path

import numpy as np

from planar3d.qc import save_ras_overlay_png
from planar3d.qc_page import QCRow, scan_warnings, write_qc_page

out = Path(sys.argv[1])
(out / "qc").mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
affine = np.diag([-1.0, 1.0, 3.0, 1.0])  # LAS storage: drawn in RAS with labels
rows = []
for name, lesions, constant in [("sub-01_FLAIR.nii.gz", 3, False), ("sub-02_FLAIR.nii.gz", 0, False),
                                ("odd <name> & co\nline2.nii.gz", 0, True)]:
    z, y, x = np.mgrid[:40, :48, :16].astype(float)
    head = ((z - 20) / 17) ** 2 + ((y - 24) / 21) ** 2 + ((x - 8) / 9) ** 2 < 1
    flair = np.where(head, rng.normal(300, 25, head.shape), rng.normal(10, 3, head.shape)).astype(np.float32)
    mask = np.zeros(head.shape, bool)
    for k in range(lesions):
        centre = (12 + 8 * k, 18 + 5 * k, 4 + 3 * k)
        mask |= ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + 9 * (x - centre[2]) ** 2) < 10
    flair[mask] += 250
    if constant:
        flair[:] = 7
    montage = f"qc/case{len(rows)}.png"
    save_ras_overlay_png(flair, {"prediction": mask}, affine, out / montage)
    rows.append(QCRow(name, montage, lesions, float(mask.sum()) * 3.0 / 1000.0, 1.5 + len(rows), scan_warnings(flair, mask)))
print(write_qc_page(out, rows, title="planar3d QC (generated example)"))
PY
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --screenshot="$png" --window-size=1200,900 \
  "file://$(cd "$out" && pwd)/qc/index.html" 2>/dev/null
rm -rf "$profile"
echo "screenshot: $png"
