"""Provenance of a predicted mask: which model(s) and settings made it, and whether a rerun may reuse it.

``predict`` skips an existing output only when it was made by the same model files (SHA-256)
and the same settings (threshold, minimum lesion size, TTA, window and overlap, precision,
output layout, planar3d version); otherwise it recomputes it and says why (nnU-Net's ``--continue_prediction``).
The record lives in three places:

* a sidecar JSON beside each mask (``x_mask.nii.gz`` -> ``x_mask.json``, the BIDS convention):
  the full record (:func:`prediction_record`), which :func:`reuse_problem` compares;
* the mask's NIfTI header: ``descrip`` (80 characters: ``planar3d 0.1.0 model 1a2b3c4d5e6f thr 0.5``)
  and ``intent_name`` ``planar3d-mask``, so the file alone says what made it (geometry fields untouched);
* ``predictions.json``: the same record for the whole batch.

Example:
    >>> record = prediction_record([{"path": "run/best.pt", "sha256": "ab" * 32, "threshold": 0.5}],
    ...                            {"threshold": 0.5, "min_lesion_size": 3.0, "flip_axes": [], "roi_size": [-1, -1, 16],
    ...                             "overlap": 0.25}, layout="suffix", version="0.1.0")
    >>> header_description(record)
    'planar3d 0.1.0 model abababababab thr 0.5'
    >>> reuse_problem(record, record) is None
    True
    >>> reuse_problem(record, {**record, "settings": {**record["settings"], "threshold": 0.9}})
    'made with threshold 0.5, now 0.9'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from planar3d.naming import strip_nifti_extension

RECORD_FORMAT = "planar3d-prediction/1"
#: NIfTI ``intent_name`` of planar3d masks (16 characters at most).
MASK_INTENT_NAME = "planar3d-mask"
#: Settings that change the output, compared by :func:`reuse_problem`. The device and batch size are
#: not: a device changes the mask only through its precision (bf16 or fp32), which is compared.
COMPARED_SETTINGS = ("threshold", "min_lesion_size", "core_threshold", "tta", "roi_size", "overlap", "precision", "layout",
                     "brain_mask", "grey_matter_max")


def prediction_record(models: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], layout: str = "suffix",
                      version: Optional[str] = None) -> Dict[str, Any]:
    """The provenance record of a prediction run.

    Args:
        models: one ``{"path", "sha256", "threshold"}`` per model (several: an ensemble).
        settings: the inference settings (``threshold``, ``min_lesion_size``, ``core_threshold``,
            ``flip_axes``, ``roi_size``, ``overlap``, ``precision``, ``brain_mask``,
            ``grey_matter_max``; others are kept
            but not compared).
        layout: the output layout (:data:`planar3d.naming.LAYOUTS`).
        version: planar3d's version (default: this package's).
    """
    if version is None:
        from planar3d import __version__ as version
    return {
        "format": RECORD_FORMAT,
        "planar3d_version": version,
        "models": [{"path": str(m.get("path")), "sha256": m.get("sha256"), "threshold": m.get("threshold")} for m in models],
        "settings": {
            "threshold": float(settings["threshold"]),
            "min_lesion_size": float(settings["min_lesion_size"]),
            "core_threshold": None if settings.get("core_threshold") is None else float(settings["core_threshold"]),
            "tta": bool(list(settings.get("flip_axes") or [])),
            "roi_size": [int(r) for r in settings["roi_size"]],
            "overlap": float(settings["overlap"]),
            "precision": str(settings.get("precision", "fp32")),
            "layout": layout,
            "brain_mask": settings.get("brain_mask"),
            "grey_matter_max": None if settings.get("grey_matter_max") is None else float(settings["grey_matter_max"]),
        },
    }


def header_description(record: Mapping[str, Any]) -> str:
    """The mask header's ``descrip`` (at most 80 characters): version, first model's SHA-256 prefix, threshold."""
    models = record.get("models") or []
    sha = str((models[0].get("sha256") if models else None) or "unknown")[:12]
    what = f"model {sha}" if len(models) <= 1 else f"ensemble of {len(models)} {sha}"
    text = f"planar3d {record.get('planar3d_version')} {what} thr {record['settings']['threshold']:g}"
    if record["settings"].get("precision") == "bf16":
        text += " bf16"
    return text[:80]


def sidecar_path(mask: str | os.PathLike) -> Path:
    """``x_mask.nii.gz`` -> ``x_mask.json`` (the BIDS sidecar name)."""
    stem = Path(strip_nifti_extension(Path(mask)))
    return stem.with_name(stem.name + ".json")


def read_sidecar(mask: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The record beside ``mask``, or None when there is none or it is unreadable."""
    try:
        data = json.loads(sidecar_path(mask).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == RECORD_FORMAT else None


def _shas(record: Mapping[str, Any]) -> list:
    return [m.get("sha256") for m in record.get("models") or []]


def reuse_problem(existing: Optional[Mapping[str, Any]], wanted: Mapping[str, Any]) -> Optional[str]:
    """Why an output with record ``existing`` must be recomputed for ``wanted``; None when it may be reused.

    Model files are compared by SHA-256 (a moved run folder is the same model), settings by
    :data:`COMPARED_SETTINGS`, and the planar3d version.
    """
    if existing is None:
        return "no provenance record beside it (made by another tool or an older planar3d)"
    problems = []
    if _shas(existing) != _shas(wanted):
        def short(shas):
            return ", ".join(str(s)[:12] for s in shas) or "none"
        problems.append(f"made by model {short(_shas(existing))}, now {short(_shas(wanted))}")
    old, new = existing.get("settings") or {}, wanted.get("settings") or {}
    for key in COMPARED_SETTINGS:
        if old.get(key) != new.get(key):
            problems.append(f"made with {key.replace('_', ' ')} {old.get(key)}, now {new.get(key)}")
    if existing.get("planar3d_version") != wanted.get("planar3d_version"):
        problems.append(f"made by planar3d {existing.get('planar3d_version')}, now {wanted.get('planar3d_version')}")
    return "; ".join(problems) or None
