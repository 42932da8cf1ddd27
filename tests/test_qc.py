import numpy as np
import pytest
from matplotlib.image import imread

from planar3d.errors import InputError
from planar3d.qc import DPI, PANEL_INCHES, choose_slices, plot_training_curves, robust_window, save_overlay_png


def test_choose_slices_picks_most_lesion_sorted():
    ref = np.zeros((6, 7, 8), bool)
    pred = np.zeros_like(ref)
    ref[:, :, 5] = True  # 42 voxels in slice 5 along axis 2
    pred[0:3, 0:3, 2] = True  # 9 in slice 2
    pred[0:2, 0:2, 6] = True  # 4 in slice 6
    ref[0, 0, 0] = True  # 1 in slice 0
    assert choose_slices([ref, pred], plane_axis=2, n_slices=3) == [2, 5, 6]
    assert choose_slices([ref, pred], plane_axis=2, n_slices=1) == [5]
    # along axis 0: slice 0 has 7*1 (ref slice 5 row) + 1 + 3 + 2 = 13, slices 1,2 have 7+3(+2 for 1)
    assert choose_slices([ref, pred], plane_axis=0, n_slices=2) == [0, 1]


def test_choose_slices_ties_and_empty():
    mask = np.zeros((3, 3, 5), bool)
    mask[1, 1, [1, 3, 4]] = True
    assert choose_slices([mask], 2, 2) == [1, 3]
    assert choose_slices([np.zeros((3, 3, 9), bool)], 2, 3) == [3, 4, 5]
    assert choose_slices([np.zeros((3, 3, 2), bool)], 2, 3) == [0, 1]


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
    assert plot_training_curves(log, out) == ["train_loss", "val_loss", "val_dice"]
    assert imread(out).shape[:2] == (400, 1000)


def test_training_curves_bad_csv(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("step,loss\n1,2\n")
    with pytest.raises(InputError, match="metrics.csv.*epoch"):
        plot_training_curves(log, tmp_path / "x.png")
    with pytest.raises(InputError, match="missing.csv"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
