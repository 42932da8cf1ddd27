"""Per-scan lesion report: known answers on an anisotropic oblique grid, CSVs, folder summary."""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from planar3d.errors import InputError
from planar3d.lesion_report import (
    LESIONS_CSV, SCANS_CSV, SUMMARY_CSV, LesionRow, ScanRow, report_from_files, scan_lesion_report, summarize,
    write_report_csvs,
)

# Rotated about z by atan(4/3), voxel sizes 5 x 2.5 x 2 mm: columns (3,4,0), (-2,1.5,0), (0,0,2)
# have exact norms, so every expected number below is exact in floating point.
AFFINE = np.array([[3.0, -2.0, 0.0, 10.0], [4.0, 1.5, 0.0, -20.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1]])
SHAPE = (12, 10, 9)


def _two_cubes():
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 1:4, 3:6] = 1        # 27 voxels, centre (3, 2, 4)
    mask[8:10, 6:8, 0:2] = 1       # 8 voxels, centre (8.5, 6.5, 0.5)
    mask[5, 4, 6] = 1              # one voxel touching the first cube only at a corner (not 6-connected)
    probability = np.zeros(SHAPE, np.float32)
    probability[3, 2, 4] = 0.75
    probability[2, 1, 3] = 0.5
    probability[9, 7, 1] = 0.625
    probability[5, 4, 6] = 0.25
    return mask, probability


def test_voxel_size():
    from planar3d.io import voxel_size

    assert voxel_size(AFFINE) == (5.0, 2.5, 2.0)


def test_two_cubes_known_answer():
    mask, probability = _two_cubes()
    brain = np.zeros(SHAPE, bool)
    brain[:10, :10, :] = True  # 900 voxels = 22.5 mL
    scan, lesions = scan_lesion_report(mask, AFFINE, "s1", probability=probability, brain_mask=brain)
    assert len(lesions) == 3  # 25 mm³ single voxel is above MSSEG's 3 mm³
    assert scan == ScanRow("s1", 3, (27 + 8 + 1) * 25.0 / 1000.0, 22.5, 100.0 * 900.0 / 22500.0)
    assert lesions[0] == LesionRow("s1", 1, 27, 675.0, *apply_affine(AFFINE, [3.0, 2.0, 4.0]), 0.75)
    assert tuple(apply_affine(AFFINE, [3.0, 2.0, 4.0])) == (15.0, -5.0, 13.0)
    assert lesions[1] == LesionRow("s1", 2, 1, 25.0, *apply_affine(AFFINE, [5.0, 4.0, 6.0]), 0.25)
    assert lesions[2] == LesionRow("s1", 3, 8, 200.0, *apply_affine(AFFINE, [8.5, 6.5, 0.5]), 0.625)
    assert (lesions[2].centroid_x_mm, lesions[2].centroid_y_mm, lesions[2].centroid_z_mm) == (22.5, 23.75, 6.0)


def test_min_lesion_size_and_no_optional_maps():
    mask, _ = _two_cubes()
    scan, lesions = scan_lesion_report(mask, AFFINE, "s1", min_lesion_size=25.0)  # the 25 mm³ voxel is dropped
    assert [(row.lesion_id, row.voxels) for row in lesions] == [(1, 27), (2, 8)]
    assert scan.lesion_count == 2 and scan.lesion_volume_ml == 0.875
    assert math.isnan(scan.brain_volume_ml) and math.isnan(scan.lesion_load_percent_of_brain)
    assert all(math.isnan(row.max_probability) for row in lesions)
    empty, none = scan_lesion_report(np.zeros(SHAPE), AFFINE, "e", brain_mask=np.ones(SHAPE))
    assert none == [] and empty == ScanRow("e", 0, 0.0, 12 * 10 * 9 * 25.0 / 1000.0, 0.0)
    with pytest.raises(ValueError, match="s1: probability has shape"):
        scan_lesion_report(mask, AFFINE, "s1", probability=np.zeros((2, 2, 2)))


def test_report_from_files_and_csvs(tmp_path):
    mask, probability = _two_cubes()
    nib.save(nib.Nifti1Image(mask, AFFINE), tmp_path / "a_mask.nii.gz")
    nib.save(nib.Nifti1Image(probability, AFFINE), tmp_path / "a_prob.nii.gz")
    scan, lesions = report_from_files(tmp_path / "a_mask.nii.gz", probability=tmp_path / "a_prob.nii.gz")
    assert scan.scan == "a_mask.nii.gz" and scan.lesion_count == 3
    assert [row.max_probability for row in lesions] == [0.75, 0.25, 0.625]
    assert lesions[0].volume_mm3 == 675.0

    other, _ = scan_lesion_report(np.zeros(SHAPE), AFFINE, "b")
    paths = write_report_csvs(tmp_path / "report", [scan, other], lesions)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted([SCANS_CSV, LESIONS_CSV, SUMMARY_CSV])
    with open(paths["scans"], newline="") as stream:
        assert list(csv.reader(stream)) == [
            ["scan", "lesion_count", "lesion_volume_ml", "brain_volume_ml", "lesion_load_percent_of_brain"],
            ["a_mask.nii.gz", "3", "0.9", "", ""], ["b", "0", "0.0", "", ""]]
    with open(paths["lesions"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["lesion_id"], r["volume_mm3"], r["centroid_x_mm"], r["centroid_y_mm"], r["centroid_z_mm"], r["max_probability"])
            for r in rows] == [("1", "675.0", "15.0", "-5.0", "13.0", "0.75"), ("2", "25.0", "17.0", "6.0", "17.0", "0.25"),
                               ("3", "200.0", "22.5", "23.75", "6.0", "0.625")]
    assert paths["summary"].read_text() == (
        "scans,scans_with_lesions,lesions,lesion_volume_ml_total,lesion_volume_ml_mean\n2,1,3,0.9,0.45\n")


def test_report_from_files_rejects_other_grid(tmp_path):
    mask, _ = _two_cubes()
    nib.save(nib.Nifti1Image(mask, AFFINE), tmp_path / "a_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), np.eye(4)), tmp_path / "brain.nii.gz")
    with pytest.raises(InputError, match="brain.nii.gz.*not on the grid of a_mask.nii.gz"):
        report_from_files(tmp_path / "a_mask.nii.gz", brain_mask=tmp_path / "brain.nii.gz")


def test_summarize_empty():
    summary = summarize([])
    assert summary["scans"] == 0 and summary["lesions"] == 0 and math.isnan(summary["lesion_volume_ml_mean"])


def test_max_probability_equals_scipy_per_label_maximum_on_many_lesions():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    probability = rng.random((40, 36, 30)).astype(np.float32)
    mask = probability > 0.8  # hundreds of small components
    _, lesions = scan_lesion_report(mask, np.eye(4), "many", probability=probability, min_lesion_size=0.0)
    labels, n = ndimage.label(mask)  # 6-connected, in raster order like label_lesions
    expected = ndimage.maximum(probability.astype(np.float64), labels, np.arange(1, n + 1))
    assert n > 300 and len(lesions) == n
    assert [row.max_probability for row in lesions] == [float(v) for v in expected]
