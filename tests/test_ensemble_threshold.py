"""benchmarks/ensemble_threshold.py: the threshold table and choice, and a run through predict's
steps on a small synthetic set that agrees exactly with benchmarks/score_cases.py."""

from __future__ import annotations

import doctest
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ensemble_threshold  # noqa: E402
import score_cases  # noqa: E402


def test_doctests():
    assert doctest.testmod(ensemble_threshold).failed == 0


def test_best_threshold_takes_the_highest_f1_and_the_lower_of_ties():
    table = [{"threshold": 0.1, "lesion_f1": 0.30}, {"threshold": 0.3, "lesion_f1": 0.42},
             {"threshold": 0.5, "lesion_f1": 0.42}, {"threshold": 0.7, "lesion_f1": float("nan")}]
    assert ensemble_threshold.best_threshold(table) == 0.3
    with pytest.raises(ValueError, match="no threshold has a defined lesion F1"):
        ensemble_threshold.best_threshold([{"threshold": 0.5, "lesion_f1": float("nan")}])


@pytest.mark.parametrize("grid", ["", "0.5,x", "0,0.5", "0.5,1.0"])
def test_a_bad_grid_is_refused(grid):
    with pytest.raises(SystemExit, match="--grid must be comma-separated numbers in \\(0, 1\\)"):
        ensemble_threshold.parse_grid(grid)


def test_template_options_are_checked_before_any_model_loads(capsys):
    with pytest.raises(SystemExit):
        ensemble_threshold.main(["--group", "m.json", "a.pt", "--grey-matter-max", "0.5"])
    assert "--grey-matter-max needs --brain-mask mni152" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ensemble_threshold.main(["--group", "m.json", "a.pt", "--brain-mask", "mni152", "--grey-matter-max", "2"])
    assert "grey_matter_max must be a grey-matter probability in (0, 1), got 2.0" in capsys.readouterr().err


def test_grid_rows_equal_score_cases_rows_at_each_threshold(tmp_path):
    from planar3d.checkpoint import ModelCheckpoint
    from planar3d.data.manifest import load_manifest
    from planar3d.data.synth import write_synthetic_dataset
    from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
    from planar3d.preprocess import NormalizationConfig
    from pipelines.predict import load_models

    manifest = write_synthetic_dataset(tmp_path / "data", 2, seed=0, size="small", geometries=("3d",))
    config = PlanarResUNetConfig(width=0.0625)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    ModelCheckpoint(PlanarResUNet(config).state_dict(), config, NormalizationConfig(), threshold=0.5,
                    roi_size=None, overlap=0.25).save(checkpoint)
    torch.manual_seed(1)
    second = tmp_path / "model2.pt"
    ModelCheckpoint(PlanarResUNet(config).state_dict(), config, NormalizationConfig(), threshold=0.3,
                    roi_size=None, overlap=0.25).save(second)
    rows_path = tmp_path / "rows.json"
    # two groups on the same cases: one model, and an ensemble of two
    chosen = ensemble_threshold.main(["--group", str(manifest), str(checkpoint), "--group", str(manifest), str(checkpoint),
                                      str(second), "--grid", "0.5,0.3", "--json", str(rows_path)])
    rows = json.loads(rows_path.read_text())
    cases = load_manifest(manifest).cases
    half = 2 * len(cases)
    assert len(rows) == 2 * half and {r["group"] for r in rows} == {str(manifest)}
    assert [r["threshold"] for r in rows] == [0.3, 0.5] * 2 * len(cases)
    assert chosen == ensemble_threshold.best_threshold(ensemble_threshold.threshold_means(rows, [0.3, 0.5]))
    for members, group_rows in (([checkpoint], rows[:half]), ([checkpoint, second], rows[half:])):
        model, settings, _ = load_models(members, "cpu")
        for case in cases:
            for threshold in (0.3, 0.5):
                (expected,) = score_cases.score_case(model, replace(settings, threshold=threshold), case)
                (got,) = [r for r in group_rows if r["case"] == case.id and r["threshold"] == threshold]
                got.pop("group")
                assert got == pytest.approx(json.loads(json.dumps(expected)), nan_ok=True)
    # the ensemble's rows are its own (averaged probabilities), not the single model's
    assert [r["dice"] for r in rows[:half]] != [r["dice"] for r in rows[half:]]
