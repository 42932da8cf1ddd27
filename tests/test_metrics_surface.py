import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from planar3d.metrics.surface import directed_surface_distances, surface, surface_metrics


def test_surface_uses_6_connectivity():
    mask = np.zeros((7, 7, 7), bool)
    mask[1:6, 1:6, 1:6] = True
    mask[1, 1, 1] = False  # corner removed: (2,2,2) only touches it diagonally
    s = surface(mask)
    assert not s[2, 2, 2] and not s[3, 3, 3]
    assert s[1, 2, 2] and s[2, 1, 1]
    assert s.sum() == 5**3 - 3**3 - 1


def test_shifted_plane_with_anisotropic_spacing():
    # A one-voxel-thick plane is all surface: every distance is exactly one step along the shift.
    for axis, spacing in ((0, (2.0, 1.0, 0.5)), (1, (2.0, 0.75, 0.5)), (2, (2.0, 0.75, 0.5))):
        a = np.zeros((6, 5, 4), bool)
        a[(slice(None),) * axis + (2,)] = True
        b = np.roll(a, 1, axis=axis)
        assert surface_metrics(b, a, spacing) == {"hd95": spacing[axis], "assd": spacing[axis]}


def test_single_voxels_diagonal():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[2, 2, 1] = True
    d_ab, d_ba = directed_surface_distances(a, b, (2.0, 1.0, 1.0))
    assert d_ab.tolist() == [math.sqrt(5)] and d_ba.tolist() == [math.sqrt(5)]
    assert surface_metrics(a, b, (2.0, 1.0, 1.0)) == {"hd95": math.sqrt(5), "assd": math.sqrt(5)}


def test_shifted_ellipsoid_matches_monai():
    z, y, x = np.mgrid[:20, :24, :22]
    ref = ((z - 10) ** 2 * 4 + (y - 12) ** 2 + (x - 11) ** 2 * 0.25) < 36
    pred = np.roll(ref, 1, axis=0)
    spacing = (2.0, 1.0, 0.5)
    m = surface_metrics(pred, ref, spacing)
    t = lambda a: torch.from_numpy(a[None, None].astype(np.float32))  # noqa: E731
    hd = compute_hausdorff_distance(t(pred), t(ref), percentile=95, spacing=spacing).item()
    asd = compute_average_surface_distance(t(pred), t(ref), symmetric=True, spacing=spacing).item()
    assert m["hd95"] == 2.0  # a shift of one 2 mm voxel
    assert m["hd95"] == pytest.approx(hd, abs=1e-6)
    assert m["assd"] == pytest.approx(asd, abs=1e-5)
    assert 0 < m["assd"] < 2.0


def test_empty_conventions():
    empty = np.zeros((3, 3, 3), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert surface_metrics(empty, empty, (1, 1, 1)) == {"hd95": 0.0, "assd": 0.0}
    assert surface_metrics(one, empty, (1, 1, 1)) == {"hd95": math.inf, "assd": math.inf}
    assert surface_metrics(empty, one, (1, 1, 1)) == {"hd95": math.inf, "assd": math.inf}
    with pytest.raises(ValueError, match="non-empty"):
        directed_surface_distances(empty, one, (1, 1, 1))
