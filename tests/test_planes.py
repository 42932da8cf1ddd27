import pytest

from planar3d.planes import DEFAULT_PLANE_AXIS, is_thick_slice, plane_axis_from_spacing


@pytest.mark.parametrize(
    "spacing, axis",
    [
        ((0.72, 0.72, 4.0), 2),
        ((0.9, 3.0, 0.9), 1),
        ((5.0, 0.7, 0.8), 0),
        ((1.0, 1.0, 1.0), DEFAULT_PLANE_AXIS),
        ((1.0, 1.1, 1.0), DEFAULT_PLANE_AXIS),  # within 20 %: isotropic
        ((1.0, 1.0, 1.3), 2),
        ((1.3, 1.0, 1.0), 0),
    ],
)
def test_plane_axis_is_the_coarsest_axis(spacing, axis):
    assert plane_axis_from_spacing(spacing) == axis


def test_isotropic_default_can_be_chosen():
    assert plane_axis_from_spacing((1, 1, 1), default=0) == 0


@pytest.mark.parametrize("spacing", [(1, 1), (1, 0, 1), (1, -1, 1)])
def test_bad_spacing_is_rejected(spacing):
    with pytest.raises(ValueError, match="spacing"):
        plane_axis_from_spacing(spacing)


def test_thick_slice():
    assert is_thick_slice((0.72, 0.72, 4.0), 2)
    assert not is_thick_slice((1.0, 1.0, 1.0), 2)
