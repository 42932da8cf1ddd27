"""Grey/white contrast of a host scan varied per case: other scanners in one real head.

Why: models trained without a host call that host's cortex and deep grey matter lesions
(docs/training.md, "Issue 9, eleventh session"): the median grey/white ratio of its FLAIR (1.13
for the 1 mm 3D head) lies above every training host's (1.02-1.10), so after the white-matter
normalisation its grey matter is brighter than any grey matter training showed as "not a
lesion". Phantoms span 1.12-1.28, but not in real anatomy. Scaling each injected case's grey
matter by a factor drawn per case gives the training set real heads with the grey/white
contrasts of other scanners and sequences.

What is scaled: the ICBM152 grey-matter prior mapped into the host (``planar3d synth`` writes it
as the case's ``grey_matter/`` sidecar), times a ramp that leaves dark voxels alone (below 0.6x
white matter: CSF, sulci, which the affine fit of the prior overlaps) and reaches 1 at 0.8x.
White matter, where MS lesions are injected, has a grey-matter prior near 0 and keeps its
intensities. The white-matter *level estimate* can still move: on thick-slice hosts, where grey
and white matter share one histogram peak, a factor of 1.131 moved it from 69.9 to 76.0
(docs/training.md, "Issue 9, twelfth session"), and with it the injected lesions' intensity
(1.3-1.8x that level) and the normalisation, as on a real scan of that contrast.

Example:
    >>> host = np.array([100.0, 70.0, 50.0, 110.0]); grey = np.array([0.0, 1.0, 1.0, 1.0])
    >>> scale_grey_matter(host, grey, 1.1, white_matter=100.0).round(2).tolist()
    [100.0, 73.5, 50.0, 121.0]
"""

from __future__ import annotations

import numpy as np

#: Below this fraction of the white-matter level a voxel is dark (CSF) and never scaled ...
DARK_BELOW = 0.6
#: ... and from this fraction on it is scaled fully (a linear ramp in between).
TISSUE_FROM = 0.8


def scale_grey_matter(host: np.ndarray, grey_matter: np.ndarray, factor: float, white_matter: float) -> np.ndarray:
    """``host x (1 + (factor - 1) x w)``, float32, with ``w`` the grey-matter fraction (in [0, 1])
    times the ramp of the host's intensity over ``white_matter`` (module docstring).

    Raises:
        ValueError: shapes differ, ``factor`` or ``white_matter`` not positive.
    """
    host = np.asarray(host, dtype=np.float32)
    grey_matter = np.asarray(grey_matter, dtype=np.float32)
    if grey_matter.shape != host.shape:
        raise ValueError(f"grey-matter map shape {grey_matter.shape} differs from the host's {host.shape}")
    if not factor > 0 or not white_matter > 0:
        raise ValueError(f"factor and white_matter must be > 0, got {factor} and {white_matter}")
    ramp = np.clip((host / np.float32(white_matter) - DARK_BELOW) / (TISSUE_FROM - DARK_BELOW), 0.0, 1.0)
    weight = np.clip(grey_matter, 0.0, 1.0) * ramp
    return host * (1.0 + np.float32(factor - 1.0) * weight)
