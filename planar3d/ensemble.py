"""Ensembles of trained models: average their probability maps, and the ensemble's threshold.

Why: models trained on different folds (``planar3d rerun``) or seeds make partly independent
errors; averaging their probabilities removes much of the spurious, low-confidence
false-positive lesions one model produces alone, as nnU-Net does with its five folds.

Conventions (checked by :func:`check_member_conventions`):

* every member preprocesses the scan its own way (its checkpoint's ``normalization``, window
  and plane axis): the averaging happens on probabilities, not on network inputs;
* every member's map must be on the same voxel grid: the scan's RAS grid after the exact
  reorientation every checkpoint records as ``orientation: "RAS"`` (or the scan's own grid
  after the inverse reorientation, the same for every member). A member with another
  ``orientation`` is refused instead of averaging mismatched voxels.

Threshold of the ensemble (:func:`ensemble_threshold`): the mean of the members' validation
thresholds. Choosing it again on validation cases is biased for cross-validation folds (each
fold's validation cases are training cases of other folds), so the mean is the default; with
validation cases no member trained on, :func:`planar3d.thresholds.choose_threshold` on the averaged
maps is the better choice. The minimum lesion size each member chose with its threshold
(:func:`ensemble_min_lesion_size`) is averaged the same way, and so is the core threshold
(:func:`ensemble_core_threshold`) when every member has one.

Example:
    >>> import numpy as np
    >>> round(float(average_probabilities([np.full((2, 2, 2), 0.2), np.full((2, 2, 2), 0.6)])[0, 0, 0]), 6)
    0.4
    >>> ensemble_threshold([0.3, 0.5])
    0.4
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

ORIENTATION = "RAS"


def check_member_conventions(checkpoints: Sequence[Mapping], names: Optional[Sequence[str]] = None) -> None:
    """Refuse members whose probability maps would not share one voxel grid.

    Args:
        checkpoints: ``planar3d-model/1`` checkpoint dicts (only ``orientation`` is read; absent
            means ``"RAS"``, the only convention written so far).
        names: names for the error message (e.g. the run folders), default ``model 0``, ...

    Raises:
        ValueError: no member, or a member with another orientation convention (named).
    """
    if not checkpoints:
        raise ValueError("an ensemble needs at least one model")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(checkpoints))]
    for name, checkpoint in zip(names, checkpoints):
        orientation = checkpoint.get("orientation", ORIENTATION)
        if orientation != ORIENTATION:
            raise ValueError(f"{name}: its network saw {orientation!r} arrays, the ensemble averages {ORIENTATION!r} maps")


def average_probabilities(maps: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """The (weighted) mean of probability maps of one scan, as float32.

    Args:
        maps: one probability map per member, same shape (same grid, see module docstring).
        weights: non-negative member weights (default equal); normalised to sum 1.

    Raises:
        ValueError: no map, shapes differ, values outside [0, 1], or bad weights.
    """
    if not maps:
        raise ValueError("no probability map to average")
    shape = np.shape(maps[0])
    for i, m in enumerate(maps):
        if np.shape(m) != shape:
            raise ValueError(f"probability map {i} has shape {np.shape(m)}, map 0 has {shape}")
    if weights is None:
        weights = np.ones(len(maps))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(maps),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"need one non-negative weight per map, not all 0; got {weights.tolist()}")
    weights = weights / weights.sum()
    total = np.zeros(shape, np.float64)
    for w, m in zip(weights, maps):
        m = np.asarray(m)
        if m.size and (m.min() < 0 or m.max() > 1):
            raise ValueError("probability maps must lie in [0, 1]")
        total += w * m
    return total.astype(np.float32)


def ensemble_threshold(member_thresholds: Sequence[float]) -> float:
    """The ensemble's threshold: the mean of its members' thresholds (module docstring).

    Raises:
        ValueError: no threshold, or one outside (0, 1).
    """
    values = [float(t) for t in member_thresholds]
    if not values or any(not 0.0 < t < 1.0 for t in values):
        raise ValueError(f"need member thresholds in (0, 1), got {values}")
    return float(np.mean(values))


def ensemble_min_lesion_size(member_sizes: Sequence[float]) -> float:
    """The ensemble's minimum lesion size (mm³): the mean of its members' (module docstring).

    Raises:
        ValueError: no size, or a negative one.
    """
    values = [float(m) for m in member_sizes]
    if not values or any(not m >= 0.0 for m in values):
        raise ValueError(f"need member minimum lesion sizes >= 0 mm³, got {values}")
    return float(np.mean(values))


def ensemble_core_threshold(member_cores: Sequence[Optional[float]]) -> Optional[float]:
    """The ensemble's core threshold: the mean of its members' when every member chose one, else
    None (a member validated without the rule does not vouch for it).

    Example:
        >>> ensemble_core_threshold([0.6, 0.8]), ensemble_core_threshold([0.6, None])
        (0.7, None)

    Raises:
        ValueError: no member, or a core threshold outside [0, 1).
    """
    values = list(member_cores)
    if not values or any(v is not None and not 0.0 <= float(v) < 1.0 for v in values):
        raise ValueError(f"need member core thresholds in [0, 1) or None, got {values}")
    if any(v is None for v in values):
        return None
    return round(float(np.mean([float(v) for v in values])), 12)
