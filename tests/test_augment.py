"""Scanner-variation augmentation (planar3d.augment)."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from planar3d.augment import RandThickSliced, ScannerAugmentation, scanner_augmentation, simulate_thick_slices

ALL_ON = ScannerAugmentation(thick_slice_prob=1, blur_prob=1, bias_field_prob=1, histogram_prob=1, gamma_prob=1, noise_prob=1)


def _roughness(image, axis):
    """Variance of first differences along ``axis`` over the variance: 2 for white noise, ~0 for smooth."""
    return float(np.var(np.diff(image, axis=axis)) / np.var(image))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    image = (0.5 + 0.1 * rng.standard_normal((1, 24, 20, 30))).astype(np.float32)
    label = (rng.random((1, 24, 20, 30)) > 0.95).astype(np.float32)
    return {"image": image, "label": label}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_thick_slices_remove_high_frequencies_along_one_axis_only(axis):
    image = _data()["image"]
    before = [_roughness(image[0], a) for a in range(3)]
    after_image = simulate_thick_slices(image, axis, 4.0)
    after = [_roughness(after_image[0], a) for a in range(3)]
    assert all(1.9 < b < 2.1 for b in before)
    assert after[axis] < 0.3
    for a in range(3):
        if a != axis:
            assert 1.9 < after[a] < 2.1
    assert after_image.shape == image.shape and after_image.dtype == image.dtype


def test_thick_slices_keep_slab_means_and_types():
    image = _data()["image"]
    np.testing.assert_array_equal(simulate_thick_slices(image, 2, 1.0), image)
    # box average then linear interpolation keep the overall mean (up to the border samples)
    tensor = torch.from_numpy(image).to(torch.float64)
    out = simulate_thick_slices(tensor, 2, 3.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == tensor.shape
    np.testing.assert_allclose(out.mean().item(), tensor.mean().item(), atol=2e-3)
    with pytest.raises(ValueError):
        simulate_thick_slices(image, 3, 2.0)
    with pytest.raises(ValueError):
        simulate_thick_slices(image, 0, 0.5)


def test_scanner_augmentation_preserves_shape_dtype_and_labels():
    data = _data()
    transform = Compose(scanner_augmentation(ALL_ON, plane_axis=2))
    transform.set_random_state(seed=0)
    out = transform(dict(data))
    image = np.asarray(out["image"])
    assert image.shape == data["image"].shape and image.dtype == np.float32
    assert not np.allclose(image, data["image"])
    np.testing.assert_array_equal(np.asarray(out["label"]), data["label"])
    assert out["label"] is data["label"]


def test_scanner_augmentation_is_deterministic_under_a_seed():
    def run(seed):
        transform = Compose(scanner_augmentation(ALL_ON, plane_axis=1))
        transform.set_random_state(seed=seed)
        return [np.asarray(transform(_data())["image"]) for _ in range(3)]

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_probabilities_zero_leave_transforms_out_and_bad_parameters():
    none = ScannerAugmentation(thick_slice_prob=0, blur_prob=0, bias_field_prob=0, histogram_prob=0, gamma_prob=0, noise_prob=0)
    assert scanner_augmentation(none, plane_axis=2) == []
    with pytest.raises(ValueError, match="gamma_prob"):
        ScannerAugmentation(gamma_prob=1.5)
    with pytest.raises(ValueError, match="thick_slice_factor"):
        ScannerAugmentation(thick_slice_factor=(0.5, 2))
    with pytest.raises(ValueError, match="thick_slice_axis"):
        ScannerAugmentation(thick_slice_axis="z")


def test_thick_slice_axis_and_spacing_cap():
    data = _data()
    transform = RandThickSliced("image", axis=0, factor_range=(4, 4), prob=1.0, spacing_key="spacing", max_thickness_mm=6.0)
    transform.set_random_state(seed=0)
    fine = transform({**data, "spacing": (1.0, 1.0, 1.0)})["image"]
    assert _roughness(fine[0], 0) < 0.3 and _roughness(fine[0], 2) > 1.9
    coarse = transform({**data, "spacing": (5.0, 1.0, 1.0)})  # 6 / 5 < 1.5: already thick, skipped
    np.testing.assert_array_equal(coarse["image"], data["image"])
    capped = transform({**data, "spacing": (3.0, 1.0, 1.0)})["image"]  # factor 2, not 4
    np.testing.assert_allclose(capped, simulate_thick_slices(data["image"], 0, 2.0))


def test_tensors_and_meta_tensors_keep_their_type():
    from monai.data import MetaTensor

    data = _data()
    for wrap in (torch.from_numpy, lambda a: MetaTensor(torch.from_numpy(a), meta={"tag": 1})):
        image = wrap(data["image"].copy())
        out = simulate_thick_slices(image, 1, 3.0)
        assert type(out) is type(image) and out.dtype == torch.float32 and out.shape == image.shape
        np.testing.assert_allclose(np.asarray(out), simulate_thick_slices(data["image"], 1, 3.0), rtol=0, atol=1e-6)
        transform = Compose(scanner_augmentation(ALL_ON, plane_axis=0))
        transform.set_random_state(seed=1)
        result = transform({"image": image, "label": data["label"]})
        assert tuple(result["image"].shape) == data["image"].shape and result["image"].dtype == torch.float32
    assert isinstance(out, MetaTensor) and out.meta["tag"] == 1


def test_histogram_shift_of_a_nearly_constant_patch_stays_finite():
    """MONAI's shift divides by the control points' spacing, ~0 on a nearly constant patch: NaN."""
    import torch
    from monai.transforms import RandHistogramShiftd

    from planar3d.augment import FiniteRandHistogramShiftd

    patch = torch.full((1, 8, 8, 8), -1.98)
    patch[0, 0, 0, 0] = float(np.nextafter(np.float32(-1.98), np.float32(0)))  # range of one float32 step
    plain = RandHistogramShiftd("image", num_control_points=(5, 10), prob=1.0).set_random_state(0)
    assert not torch.isfinite(torch.as_tensor(plain({"image": patch.clone()})["image"])).all()
    fixed = FiniteRandHistogramShiftd("image", num_control_points=(5, 10), prob=1.0).set_random_state(0)
    assert torch.equal(torch.as_tensor(fixed({"image": patch.clone()})["image"]), patch)
    # an ordinary patch is shifted exactly as MONAI shifts it
    ordinary = torch.linspace(-2, 2, 512).reshape(1, 8, 8, 8)
    a = RandHistogramShiftd("image", num_control_points=(5, 10), prob=1.0).set_random_state(3)({"image": ordinary.clone()})
    b = FiniteRandHistogramShiftd("image", num_control_points=(5, 10), prob=1.0).set_random_state(3)({"image": ordinary.clone()})
    assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"])) and not torch.equal(torch.as_tensor(a["image"]), ordinary)
