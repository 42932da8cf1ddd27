import numpy as np
import pytest
from matplotlib.image import imread

from planar3d.errors import InputError
import planar3d.qc as qc
from planar3d.qc import (
    DPI, MASK_STYLES, PANEL_INCHES, choose_slices, orientation_labels, plot_training_curves, robust_window,
    save_overlay_png, save_ras_overlay_png, to_ras_display,
)


def test_doctests():
    import doctest

    assert doctest.testmod(qc).failed == 0


def test_choose_slices_spread_over_lesion_load():
    mask = np.zeros((6, 7, 12), bool)
    mask[0, 0, 0:10] = True  # one voxel in each of slices 0..9
    mask[:, :, 5] = True  # slice 5 dense (42 voxels), its neighbours 4 and 6 hold one voxel each
    # 51 lesion voxels; slices 0-4 hold the 1st-5th, slice 5 the 6th-47th: all three quantiles
    # (11th, 26th, 41st voxel) fall in slice 5. The free places go to the other lesion slices
    # (one voxel each), nearest slice 5 first.
    assert choose_slices([mask], plane_axis=2, n_slices=3) == [4, 5, 6]
    spread = np.zeros((4, 4, 12), bool)
    spread[0, 0, 0:10] = True  # ten lesion slices, one voxel each
    assert choose_slices([spread], plane_axis=2, n_slices=3) == [1, 4, 7]
    assert choose_slices([spread], plane_axis=2, n_slices=1) == [4]
    # two masks: the union counts; quantiles spread over both
    other = np.zeros_like(spread)
    other[1, 1, 11] = True
    assert choose_slices([spread, other], plane_axis=2, n_slices=3) == [2, 5, 8]


def test_choose_slices_empty_and_short():
    assert choose_slices([np.zeros((3, 3, 9), bool)], 2, 3) == [3, 4, 5]
    assert choose_slices([np.zeros((3, 3, 2), bool)], 2, 3) == [0, 1]
    one = np.zeros((3, 3, 9), bool)
    one[1, 1, 7] = True
    assert choose_slices([one], 2, 3) == [6, 7, 8]  # the lesion slice and its nearest neighbours


def test_to_ras_display_and_labels():
    # voxel axes: i runs posterior (A flipped), j runs left (R flipped), k superior; sizes 2, 3, 4 mm
    affine = np.array([[0.0, -3.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0, 0, 0, 1]])
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    flair, masks, spacing, codes = to_ras_display(data, {"m": data == 5}, affine)
    assert flair.shape == (3, 2, 4) and spacing == (3.0, 2.0, 4.0) and codes == ("R", "A", "S")
    # voxel (i, j, k) -> RAS index (2 - j, 1 - i, k)
    assert flair[2 - 1, 1 - 0, 1] == data[0, 1, 1]
    assert np.argwhere(masks["m"]).tolist() == [[2 - 1, 1 - 0, 1]]
    assert orientation_labels(codes, 1) == {"left": "L", "right": "R", "bottom": "I", "top": "S"}
    assert orientation_labels(("L", "P", "S"), 2) == {"left": "R", "right": "L", "bottom": "A", "top": "P"}


def _pixels_near(picture, hex_colour, tolerance=0.02):
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5)])
    return int((np.abs(picture[..., :3] - rgb).max(axis=-1) < tolerance).sum())


def test_ras_overlay_is_the_same_whatever_the_voxel_order(tmp_path):
    rng = np.random.default_rng(1)
    flair = rng.normal(100, 20, (20, 16, 10)).astype(np.float32)
    ref = np.zeros(flair.shape, bool)
    ref[5:12, 4:10, 2:8] = True
    pred = np.roll(ref, 2, axis=0)
    ras = np.diag([1.0, 1.0, 2.5, 1.0])
    # the same head stored LPS (i, j flipped): predict and evaluate must draw the same picture
    lps = ras @ np.array([[-1, 0, 0, 19], [0, -1, 0, 15], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flip = (slice(None, None, -1), slice(None, None, -1))
    a, b = tmp_path / "ras.png", tmp_path / "lps.png"
    slices = save_ras_overlay_png(flair, {"reference": ref, "prediction": pred}, ras, a)
    assert slices == [3, 4, 6]  # along z (2.5 mm, the plane axis): six equal lesion slices 2..7, the 1.2th, 3rd, 4.8th
    assert save_ras_overlay_png(flair[flip], {"reference": ref[flip], "prediction": pred[flip]}, lps, b) == slices
    first, second = imread(a), imread(b)
    assert np.array_equal(first, second)
    # colour-blind-safe contours: Okabe-Ito blue and orange present, no pure red or green
    assert _pixels_near(first, MASK_STYLES["reference"][0], 0.05) > 20
    assert _pixels_near(first, MASK_STYLES["prediction"][0], 0.05) > 20
    assert _pixels_near(first, "#ff2020", 0.1) == 0 and _pixels_near(first, "#00e000", 0.1) == 0


def test_robust_window():
    assert robust_window(np.arange(101.0)) == (1.0, 99.0)
    assert robust_window(np.zeros(10)) == (0.0, 1.0)


def test_overlay_png(tmp_path):
    rng = np.random.default_rng(0)
    flair = rng.normal(100, 20, (24, 20, 12)).astype(np.float32)
    ref = np.zeros(flair.shape, bool)
    ref[8:14, 6:12, 4:7] = True
    pred = np.roll(ref, 2, axis=0)
    out = tmp_path / "case.png"
    slices = save_overlay_png(flair, {"reference": ref, "prediction": pred}, (1.0, 1.0, 3.0), 2, out, n_slices=3)
    assert slices == [4, 5, 6]
    picture = imread(out)
    assert picture.shape[:2] == (int(PANEL_INCHES * DPI), int(3 * PANEL_INCHES * DPI))
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def test_overlay_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        save_overlay_png(np.zeros((4, 4, 4)), {"reference": np.zeros((4, 4, 5))}, (1, 1, 1), 2, tmp_path / "x.png")


def test_training_curves(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,train_loss,val_loss,val_dice,note\n0,1.0,1.1,0.2,a\n1,0.8,0.9,0.4,b\n2,0.6,0.8,\n")
    out = tmp_path / "curves.png"
    assert plot_training_curves(log, out) == [("loss", ["train_loss", "val_loss"]), ("validation scores", ["val_dice"])]
    assert imread(out).shape[:2] == (400, 800)


def test_training_curves_separate_scales(tmp_path):
    # train's metrics.csv columns: Dice (0-1) never shares an axis with voxels/s (~1e5)
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,train_loss,val_dice,val_threshold,lr,seconds,voxels_per_second\n"
                   "1,0.9,0.1,0.5,0.001,30.0,120000\n2,0.7,0.3,0.45,0.001,29.0,125000\n")
    out = tmp_path / "curves.png"
    assert plot_training_curves(log, out) == [
        ("loss", ["train_loss"]), ("validation scores", ["val_dice", "val_threshold"]), ("throughput", ["voxels_per_second"]),
        ("lr", ["lr"]), ("seconds", ["seconds"])]
    assert imread(out).shape[:2] == (400, 5 * 400)


def test_training_curves_bad_csv(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("step,loss\n1,2\n")
    with pytest.raises(InputError, match="metrics.csv.*epoch"):
        plot_training_curves(log, tmp_path / "x.png")
    with pytest.raises(InputError, match="missing.csv"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
