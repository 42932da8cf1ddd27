"""Check that the cases of a manifest can be used, before a long job starts.

Each problem is one line naming the case id, the file and what is wrong, so that a whole data set
can be checked in one pass and fixed at once.

Example:
    >>> problems = check_manifest(load_manifest("data_manifests/msseg2016.json", root="/data"))  # doctest: +SKIP
    >>> print("\\n".join(problems) or "all cases usable")                                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from planar3d.data.manifest import Case, Manifest, verify_case
from planar3d.errors import InputError
from planar3d.io import read_volume

AFFINE_TOLERANCE = 1e-4
_MAX_VALUES_LISTED = 10


def _label_values(label: np.ndarray) -> Optional[str]:
    """``None`` if the label holds only 0 and 1, else the values found (at most 10 listed)."""
    if not np.count_nonzero((label != 0) & (label != 1)):
        return None
    values = np.unique(label)
    listed = ", ".join(f"{value:g}" for value in values[:_MAX_VALUES_LISTED])
    more = f" and {len(values) - _MAX_VALUES_LISTED} more" if len(values) > _MAX_VALUES_LISTED else ""
    return listed + more


def check_case(case: Case, verify_hash: bool = True) -> list[str]:
    """Problems of one case; an empty list means it can be used.

    Checks: files exist; recorded checksums match (if ``verify_hash``); image and label are
    readable 3D NIfTI without NaN/Inf voxels; the label holds only 0 and 1; the label's shape
    equals the image's and their affines agree within 1e-4.
    """
    if verify_hash:
        problems = verify_case(case)
    else:
        problems = [
            f"case {case.id}: {key} {path}: file not found"
            for key, path in (("image", case.image), ("label", case.label))
            if path is not None and not path.is_file()
        ]
    volumes = {}
    for key, path in (("image", case.image), ("label", case.label)):
        if path is None or not path.is_file():
            continue
        try:
            volumes[key] = read_volume(path, dtype=None)
        except InputError as error:
            problems.append(f"case {case.id}: {key} {path}: {error.problem}")
    if "label" in volumes:
        values = _label_values(volumes["label"][0])
        if values is not None:
            problems.append(f"case {case.id}: label {case.label}: not binary (values found: {values})")
    if "image" in volumes and "label" in volumes:
        image, label = volumes["image"][1], volumes["label"][1]
        if image.shape != label.shape:
            problems.append(f"case {case.id}: label {case.label}: shape {label.shape} differs from the image's {image.shape}")
        else:
            difference = float(np.max(np.abs(image.affine - label.affine)))
            if difference > AFFINE_TOLERANCE:
                problems.append(
                    f"case {case.id}: label {case.label}: affine differs from the image's by up to {difference:.3g}"
                )
    return problems


def check_manifest(
    manifest: Manifest, cases: Optional[Iterable[Case]] = None, verify_hashes: bool = True
) -> list[str]:
    """Problems of all cases of ``manifest`` (or only ``cases``), see :func:`check_case`."""
    selected = manifest.cases if cases is None else cases
    return [problem for case in selected for problem in check_case(case, verify_hashes)]
