"""``planar3d rerun`` on the tiny synthetic experiment: end to end, deterministic, resumable,
compared with its reference; bad experiment files and changed data stop it before training."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import PROJECT_ROOT
from pipelines.cli import app
from planar3d.errors import ConfigError, InputError
from pipelines.experiment import load_experiment
from pipelines.rerun import rerun

EXPERIMENTS = PROJECT_ROOT / "pipelines" / "experiments"
TINY = EXPERIMENTS / "synthetic_tiny.yaml"
REFERENCE = EXPERIMENTS / "synthetic_tiny_reference.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_rerun(tmp_path_factory):
    out = tmp_path_factory.mktemp("rerun") / "a"
    result = CliRunner().invoke(app, ["rerun", str(TINY), "--out", str(out), "--compare", str(REFERENCE)])
    assert result.exit_code == 0, result.output
    return out


def weights(out):
    return torch.load(out / "runs" / "fold0_seed0" / "train" / "best.pt", weights_only=True)["state_dict"]


def test_rerun_writes_the_checklist(first_rerun):
    report = json.loads((first_rerun / "reproducibility.json").read_text())
    for entry in ("model_and_algorithm", "hyperparameters", "runs", "metrics", "results", "hardware", "software",
                  "dataset", "splits", "preprocessing", "data_checksums"):
        assert report[entry], entry
    assert report["runs"]["count"] == 1
    assert report["software"]["packages"]["torch"].startswith("2.13.0")
    assert all(f["verified"] for f in report["data_checksums"]["files"].values())
    assert report["comparison"]["disagreements"] == []
    assert "## Checklist" in (first_rerun / "reproducibility.md").read_text()


def test_same_seed_gives_bit_identical_weights_and_metrics(first_rerun, tmp_path):
    second = tmp_path / "b"
    rerun(TINY, out_dir=second)
    a, b = weights(first_rerun), weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((out / "reproducibility.json").read_text())["results"] for out in (first_rerun, second)]
    assert results[0] == results[1]


def test_complete_runs_are_skipped(first_rerun):
    report = rerun(TINY, out_dir=first_rerun)
    assert report["runs"]["per_run"][0]["reused_from_earlier_rerun"] is True


def test_compare_fails_outside_tolerance(first_rerun, tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"tolerance": 0.01, "overall": {"dice": {"mean": 0.9}}}))
    result = CliRunner().invoke(app, ["rerun", str(TINY), "--out", str(first_rerun), "--compare", str(wrong)])
    assert result.exit_code == 1
    assert "dice" in result.output and "differs from 0.9" in result.output


def test_changed_data_stops_before_training(first_rerun, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(first_rerun / "data", out / "data")
    label = out / "data" / "labels" / "case_001_lesions.nii.gz"
    label.write_bytes(label.read_bytes() + b"\0")
    with pytest.raises(InputError, match="case_001"):
        rerun(TINY, out_dir=out)
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    "text, key",
    [
        ("name: x\ndata: {synthetic: {cases: 6}}\nbogus: 1\n", "bogus"),
        ("name: x\ndata: {synthetic: {cases: many}}\n", "data.synthetic.cases"),
        ("name: x\ndata: {synthetic: {cases: 6}}\ntrain: {config: demo_cpu, overides: []}\n", "train.overides"),
        ("name: x\ndata: {}\n", "data"),
    ],
)
def test_bad_experiment_files_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_experiment(path)
    assert key in str(error.value) and "bad.yaml" in str(error.value)


def test_shipped_experiments_validate():
    names = sorted(p.name for p in EXPERIMENTS.glob("*.yaml"))
    assert {"msseg2016_paper.yaml", "msseg2016_best.yaml", "synthetic_tiny.yaml"} <= set(names)
    for path in EXPERIMENTS.glob("*.yaml"):
        experiment = load_experiment(path)
        if experiment.data.manifest:
            from pipelines.experiment import resolve

            assert resolve(experiment.data.manifest, path).is_file()
