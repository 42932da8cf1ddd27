import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.evaluate import evaluate_folder, summarise
from pipelines.cli import app

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (16, 16, 8)


def save(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), affine), path)


def cube(x0, x1, shape=SHAPE):
    mask = np.zeros(shape, np.uint8)
    mask[x0:x1, 4:8, 2:4] = 1
    return mask


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    save(ref / "a.nii.gz", cube(2, 6))  # 4x4x2 voxels of 2 mm³
    save(pred / "a_mask.nii.gz", cube(4, 8))  # half overlap -> Dice 0.5
    save(ref / "sub" / "b.nii.gz", cube(2, 6))
    save(pred / "sub" / "b.nii.gz", cube(2, 6))  # identical name, perfect
    save(ref / "c.nii.gz", np.zeros(SHAPE))
    save(pred / "c_mask.nii.gz", cube(2, 6))  # reference empty -> undefined values
    save(ref / "d.nii.gz", cube(2, 6))  # prediction missing
    save(ref / "e.nii.gz", cube(2, 6))
    save(pred / "e_mask.nii.gz", cube(2, 6, shape=(16, 16, 9)))  # wrong shape
    save(ref / "f.nii.gz", cube(2, 6))
    save(pred / "f_mask.nii.gz", cube(2, 6), affine=np.diag([1.0, 1.0, 3.0, 1.0]))  # wrong affine
    save(pred / "stray_mask.nii.gz", cube(2, 6))
    save(pred / "a_prob.nii.gz", cube(2, 6))
    return tmp_path


def test_summarise_counts_undefined():
    assert summarise([1.0, 3.0, math.nan, math.inf]) == {"mean": 2.0, "std": 1.0, "n": 2, "n_cases": 4, "n_undefined": 2}
    assert summarise([math.nan]) == {"mean": None, "std": None, "n": 0, "n_cases": 1, "n_undefined": 1}


def test_evaluate_folder(folders):
    out = folders / "out"
    result = evaluate_folder(folders / "pred", ref_dir=folders / "ref", out_dir=out)
    by_id = {case.id: case for case in result.cases}
    assert sorted(by_id) == ["a", "c", "d", "e", "f", "sub/b"]
    assert by_id["a"].metrics["dice"] == 0.5 and by_id["a"].metrics["volume_ref_mm3"] == 64.0
    assert by_id["a"].metrics["hd95"] == 2.0
    assert by_id["sub/b"].metrics["dice"] == 1.0 and by_id["sub/b"].metrics["hd95"] == 0.0
    assert by_id["c"].metrics["hd95"] == math.inf and math.isnan(by_id["c"].metrics["sensitivity"])
    assert "missing prediction" in by_id["d"].error
    assert "e_mask.nii.gz" in by_id["e"].error and "shape" in by_id["e"].error
    assert "affine" in by_id["f"].error
    assert [case.id for case in result.failed] == ["d", "e", "f"]
    assert result.unpaired_predictions == ["stray_mask.nii.gz"]
    assert result.overall["dice"] == {"mean": 0.5, "std": math.sqrt(1 / 6), "n": 3, "n_cases": 3, "n_undefined": 0}
    assert result.overall["hd95"]["n_undefined"] == 1 and result.overall["hd95"]["mean"] == 1.0

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["status"] for row in rows] == ["ok", "ok", "failed", "failed", "failed", "ok"]
    assert rows[1]["hd95"] == "inf" and rows[0]["dice"] == "0.5"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 3 and summary["parameters"]["min_lesion_size_mm3"] == 3.0
    assert summary["cases"][1]["metrics"]["hd95"] == "inf" and "dice" in summary["definitions"]
    report = (out / "report.md").read_text()
    assert "[png](qc/a.png)" in report and "[png](qc/sub__b.png)" in report and "stray_mask" in report
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.png", "c.png", "sub__b.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def manifest_setup(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    flair = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)
    cases = []
    for name, group, x in (("p1", "center1", 2), ("p2", "center1", 3), ("p3", "center2", 2)):
        nib.save(nib.Nifti1Image(flair, AFFINE), _mk(data / name / "flair.nii.gz"))
        save(data / name / "lesion.nii.gz", cube(2, 6))
        save(pred / name / "flair_mask.nii.gz", cube(x, x + 4))
        cases.append({"id": name, "image": f"{name}/flair.nii.gz", "label": f"{name}/lesion.nii.gz", "group": group})
    cases.append({"id": "u", "image": "p1/flair.nii.gz", "label": None, "group": "center2"})
    (pred / "p3" / "flair_mask.nii.gz").unlink()
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"format": "planar3d-manifest/1", "dataset": "toy", "root": "data",
                                    "cases": cases, "folds": [["p1", "p3"], ["p2"]]}))
    return manifest, pred


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_evaluate_manifest_groups_and_folds(tmp_path):
    manifest, pred = manifest_setup(tmp_path)
    result = evaluate_folder(pred, manifest=manifest, out_dir=tmp_path / "out")
    assert [c.id for c in result.cases] == ["p1", "p2", "p3"] and result.unlabeled_cases == ["u"]
    assert [c.id for c in result.failed] == ["p3"] and "missing prediction" in result.failed[0].error
    assert result.cases[1].metrics["dice"] == 0.75
    assert result.groups["center1"]["dice"]["mean"] == 0.875 and result.groups["center1"]["dice"]["n"] == 2
    assert result.groups["center2"]["dice"]["n"] == 0  # its only case failed
    assert "center1" in (tmp_path / "out" / "report.md").read_text()
    fold = evaluate_folder(pred, manifest=manifest, fold=1)
    assert [c.id for c in fold.cases] == ["p2"] and not fold.failed


def test_cli_folder_mode_reports_failures(folders):
    out = folders / "report"
    run = CliRunner().invoke(app, ["evaluate", "--pred", str(folders / "pred"), "--ref", str(folders / "ref"),
                                   "--out", str(out), "--no-qc"])
    assert run.exit_code == 1
    assert "| dice | 0.5 ± 0.408 | 3 | 0 |" in run.output
    assert "3 of 6 cases failed" in run.output and "`d`: missing prediction" in run.output
    assert (out / "summary.json").exists() and not (out / "qc").exists()


def test_cli_success_and_argument_errors(tmp_path):
    manifest, pred = manifest_setup(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", "--pred", str(pred), "--manifest", str(manifest), "--fold", "1",
                             "--root", str(tmp_path / "data"), "--min-lesion-size", "0"])
    assert ok.exit_code == 0, ok.output
    assert (pred / "evaluation" / "qc" / "p2.png").exists()
    both = runner.invoke(app, ["evaluate", "--pred", str(pred), "--ref", str(pred), "--manifest", str(manifest)])
    assert both.exit_code == 1 and "exactly one of --ref and --manifest" in both.output
    missing = runner.invoke(app, ["evaluate", "--pred", str(tmp_path / "nope"), "--ref", str(pred)])
    assert missing.exit_code == 1 and "nope: prediction folder not found" in missing.output
