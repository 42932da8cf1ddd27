"""Issue 11: predict and train behave as users of nnU-Net, LST-AI and BIDS apps expect.

Provenance and safe reuse of outputs, FLAIR-only folder inputs, output layouts and evaluation
pairing by case id, lesion report and QC page, ensembles, device ``auto``, run-folder safety,
layered configs with "did you mean", ``-h`` and option aliases. Tiny random-weight networks run
on tiny volumes: the files around the masks are what is tested.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import load_config
from pipelines.predict import predict_folder, resolve_device
from pipelines.prediction_record import MASK_INTENT_NAME, read_sidecar, sidecar_path
from pipelines.train import check_run_folder, train
from planar3d import __version__
from planar3d.checkpoint import ModelCheckpoint
from planar3d.errors import ConfigError, InputError
from planar3d.io import sha256_file
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig

SHAPE = (16, 12, 8)


def _scan(path, seed=0, affine=None):
    rng = np.random.default_rng(seed)
    data = (rng.normal(20, 5, SHAPE) + (rng.random(SHAPE) > 0.4) * 400).clip(0).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=2)
    nib.save(image, path)
    return path


def _run(folder, seed, threshold, min_lesion_size=3.0):
    config = PlanarResUNetConfig(width=0.0625)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ModelCheckpoint(PlanarResUNet(config).state_dict(), config, NormalizationConfig(), threshold=threshold,
                    roi_size=None, overlap=0.25, min_lesion_size=min_lesion_size).save(folder / "best.pt")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return _run(root / "a", 0, 0.4), _run(root / "b", 1, 0.6, min_lesion_size=9.0)


@pytest.fixture
def scans(tmp_path):
    for index, name in enumerate(["s1.nii.gz", "s2.nii.gz"]):
        _scan(tmp_path / "in" / name, seed=index)
    return tmp_path / "in"


# --- provenance and reuse ----------------------------------------------------------------------


def test_provenance_in_header_sidecar_and_summary(scans, runs, tmp_path):
    out = tmp_path / "out"
    predict_folder(scans, out, runs[0], progress=False)
    mask, scan = nib.load(out / "s1_mask.nii.gz"), nib.load(scans / "s1.nii.gz")
    sha = sha256_file(runs[0] / "best.pt")
    descrip = mask.header["descrip"].tobytes().rstrip(b"\0").decode()
    assert descrip == f"planar3d {__version__} model {sha[:12]} thr 0.4"
    assert mask.header["intent_name"].tobytes().rstrip(b"\0").decode() == MASK_INTENT_NAME
    # the provenance leaves the geometry exactly as the input's
    assert np.array_equal(mask.affine, scan.affine)
    assert np.array_equal(mask.header.get_qform(), scan.header.get_qform())
    assert np.array_equal(mask.header.get_sform(), scan.header.get_sform())
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (1, 2)
    assert np.array_equal(mask.header["pixdim"], scan.header["pixdim"])
    record = read_sidecar(out / "s1_mask.nii.gz")
    assert sidecar_path(out / "s1_mask.nii.gz") == out / "s1_mask.json"
    assert record["models"] == [{"path": str(runs[0] / "best.pt"), "sha256": sha, "threshold": 0.4}]
    assert record["planar3d_version"] == __version__
    assert {k: v for k, v in record["settings"].items() if k not in ("device", "host_memory")} == {"threshold": 0.4, "min_lesion_size": 3.0, "core_threshold": None, "tta": False, "roi_size": [-1, -1, -1],
                                  "overlap": 0.25, "precision": "fp32", "layout": "suffix", "brain_mask": None,
                                  "grey_matter_max": None}
    assert record["scan"]["name"] == "s1.nii.gz"
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["provenance"]["models"][0]["sha256"] == sha
    assert summary["provenance"]["planar3d_version"] == __version__
    assert summary["provenance"]["settings"]["device"] == "cpu"
    from planar3d.host_memory import configure_host_memory

    # this process's setting (set once, by whichever job ran first), recorded, not compared
    assert record["settings"]["host_memory"] == configure_host_memory("retain")


def test_rerun_reuses_only_same_model_and_settings(scans, runs, tmp_path):
    out = tmp_path / "out"
    predict_folder(scans, out, runs[0], progress=False)
    same = predict_folder(scans, out, runs[0], progress=False)
    assert [r.status for r in same.results] == ["skipped", "skipped"]
    other_threshold = predict_folder(scans, out, runs[0], threshold=0.9, progress=False)
    assert [r.status for r in other_threshold.results] == ["done", "done"]
    assert other_threshold.results[0].redone == "made with threshold 0.4, now 0.9"
    assert "2 existing outputs recomputed" in other_threshold.text()
    assert read_sidecar(out / "s1_mask.nii.gz")["settings"]["threshold"] == 0.9
    other_core = predict_folder(scans, out, runs[0], threshold=0.9, core_threshold=0.95, progress=False)
    assert other_core.results[0].redone == "made with core threshold None, now 0.95"
    other_threshold = predict_folder(scans, out, runs[0], threshold=0.9, progress=False)
    assert other_threshold.results[0].redone == "made with core threshold 0.95, now None"
    assert json.loads((out / "predictions.json").read_text())["provenance"]["settings"]["threshold"] == 0.9
    other_model = predict_folder(scans, out, runs[1], threshold=0.9, progress=False)
    assert len(other_model.done) == 2 and other_model.results[0].redone.startswith("made by model ")
    assert read_sidecar(out / "s2_mask.nii.gz")["models"][0]["sha256"] == sha256_file(runs[1] / "best.pt")
    # a mask without a record (another tool, an older planar3d) is recomputed, and said so
    sidecar_path(out / "s1_mask.nii.gz").unlink()
    again = predict_folder(scans, out, runs[1], threshold=0.9, progress=False)
    assert [r.status for r in again.results] == ["done", "skipped"]
    assert again.results[0].redone.startswith("no provenance record")


def test_bf16_on_the_cpu_is_an_opt_in_recorded_and_compared(scans, runs, tmp_path):
    out = tmp_path / "out"
    fp32 = predict_folder(scans, out, runs[0], progress=False, save_probabilities=True)  # auto on the CPU: fp32
    assert [r.status for r in fp32.results] == ["done", "done"]
    assert read_sidecar(out / "s1_mask.nii.gz")["settings"]["precision"] == "fp32"
    reference = np.asarray(nib.load(out / "s1_prob.nii.gz").dataobj)
    bf16 = predict_folder(scans, out, runs[0], progress=False, save_probabilities=True, precision="bf16")
    assert [r.status for r in bf16.results] == ["done", "done"]  # not reused: other precision
    assert bf16.results[0].redone == "made with precision fp32, now bf16"
    record = read_sidecar(out / "s1_mask.nii.gz")
    assert record["settings"]["precision"] == "bf16"
    descrip = nib.load(out / "s1_mask.nii.gz").header["descrip"].tobytes().rstrip(b"\0").decode()
    assert descrip.endswith(" bf16")
    probability = np.asarray(nib.load(out / "s1_prob.nii.gz").dataobj)
    assert probability.shape == reference.shape
    assert 0 < np.abs(probability - reference).max() < 0.02  # bf16 rounding, not another result
    again = predict_folder(scans, out, runs[0], progress=False, save_probabilities=True, precision="bf16")
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        predict_folder(scans, out, runs[0], progress=False, precision="fp16")
    result = CliRunner().invoke(app, ["predict", "-i", str(scans), "--out", str(tmp_path / "o"), "-m", str(runs[0]),
                                      "--precision", "half"])
    assert result.exit_code == 1 and "--precision must be auto, fp32 or bf16" in result.output


def test_cli_default_device_is_auto(runs, scans, tmp_path):
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    result = CliRunner().invoke(app, ["predict", "-i", str(scans), "--out", str(tmp_path / "o"), "-m", str(runs[0])])
    assert result.exit_code == 0, result.output
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "o/predictions.json").read_text())["provenance"]["settings"]["device"] == device


# --- inputs and layouts ------------------------------------------------------------------------


def test_bids_root_takes_flair_only_and_writes_a_derivative(runs, tmp_path):
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    _scan(root / "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz")
    _scan(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", seed=1)
    _scan(root / "sub-02/anat/sub-02_FLAIR.nii.gz", seed=2)
    _scan(root / "derivatives/manual/sub-02/anat/sub-02_desc-lesion_mask.nii.gz", seed=3)
    out = tmp_path / "out"
    summary = predict_folder(root, out, runs[0], layout="bids", progress=False)
    assert [r.input for r in summary.done] == [str(root / "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz"),
                                               str(root / "sub-02/anat/sub-02_FLAIR.nii.gz")]
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert masks == ["derivatives/planar3d/sub-01/ses-1/anat/sub-01_ses-1_desc-lesion_mask.nii.gz",
                     "derivatives/planar3d/sub-02/anat/sub-02_desc-lesion_mask.nii.gz"]
    description = json.loads((out / "derivatives/planar3d/dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Version"] == __version__
    left = {item["path"]: item["reason"] for item in json.loads((out / "predictions.json").read_text())["left_out"]}
    assert set(left) == {str(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"),
                         str(root / "derivatives/manual/sub-02/anat/sub-02_desc-lesion_mask.nii.gz")}
    assert "left out 2 NIfTI files" in summary.text()


def test_nnunet_folder_layout_and_evaluate_pairs_by_case_id(runs, tmp_path):
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    for case in ("BraTS_0001", "BraTS_0002"):
        _scan(images / f"{case}_0000.nii.gz")
        _scan(images / f"{case}_0001.nii.gz", seed=5)  # another channel: never read
    out = tmp_path / "pred"
    summary = predict_folder(images, out, runs[0], layout="nnunet", progress=False)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["BraTS_0001.nii.gz", "BraTS_0002.nii.gz"]
    assert len(summary.left_out) == 2 and all("channel 0001" in item.reason for item in summary.left_out)
    # references: nnU-Net labels and planar3d synth's label names both pair with the predictions
    for case in ("BraTS_0001", "BraTS_0002"):
        labels.mkdir(exist_ok=True)
        nib.save(nib.load(out / f"{case}.nii.gz"), labels / f"{case}.nii.gz")
    from pipelines.evaluate import evaluate_folder

    result = evaluate_folder(out, ref_dir=labels, out_dir=tmp_path / "eval", qc=False)
    assert not result.failed and len(result.cases) == 2
    assert [c.metrics["dice"] for c in result.cases] == [1.0, 1.0]


def test_evaluate_pairs_synth_labels_with_suffix_predictions(runs, tmp_path):
    synth = tmp_path / "synth"
    for case in ("case_000", "case_001"):
        _scan(synth / "images" / f"{case}_flair.nii.gz")
    out = tmp_path / "pred"
    predict_folder(synth / "images", out, runs[0], progress=False)  # case_000_flair_mask.nii.gz
    for case in ("case_000", "case_001"):
        (synth / "labels").mkdir(exist_ok=True)
        nib.save(nib.load(out / f"{case}_flair_mask.nii.gz"), synth / "labels" / f"{case}_lesions.nii.gz")
    from pipelines.evaluate import evaluate_folder

    result = evaluate_folder(out, ref_dir=synth / "labels", out_dir=tmp_path / "eval", qc=True)
    assert not result.failed and [c.metrics["dice"] for c in result.cases] == [1.0, 1.0]
    assert [c.prediction.name for c in result.cases] == ["case_000_flair_mask.nii.gz", "case_001_flair_mask.nii.gz"]
    assert all((tmp_path / "eval" / c.qc).is_file() for c in result.cases)


def test_pattern_chooses_inputs(runs, tmp_path):
    _scan(tmp_path / "in/a_flair.nii.gz")
    _scan(tmp_path / "in/a_t1.nii.gz", seed=1)
    summary = predict_folder(tmp_path / "in", tmp_path / "out", runs[0], pattern="*_flair.nii.gz", progress=False)
    assert [r.input for r in summary.done] == [str(tmp_path / "in/a_flair.nii.gz")]
    assert [item.reason for item in summary.left_out] == ["does not match --pattern '*_flair.nii.gz'"]
    with pytest.raises(InputError, match="no scans found"):
        predict_folder(tmp_path / "in", tmp_path / "out2", runs[0], pattern="*.nii", progress=False)


# --- lesion report, QC page, ensemble ----------------------------------------------------------


def test_lesion_report_and_qc_page(scans, runs, tmp_path):
    out = tmp_path / "out"
    summary = predict_folder(scans, out, runs[0], threshold=0.5, min_lesion_size=0, qc=True, save_probabilities=True,
                             progress=False)
    with open(out / "lesion_report_scans.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["scan"] for row in rows] == ["s1.nii.gz", "s2.nii.gz"]
    assert [int(row["lesion_count"]) for row in rows] == [r.lesions for r in summary.results]
    volumes = [float(row["lesion_volume_ml"]) * 1000 for row in rows]
    assert volumes == pytest.approx([r.lesion_volume_mm3 for r in summary.results], rel=1e-12)
    with open(out / "lesion_report_lesions.csv") as stream:
        lesions = list(csv.DictReader(stream))
    assert len(lesions) == sum(r.lesions for r in summary.results)
    mask = np.asarray(nib.load(out / "s1_mask.nii.gz").dataobj)
    assert sum(int(row["voxels"]) for row in lesions if row["scan"] == "s1.nii.gz") == int(mask.sum())
    probability = np.asarray(nib.load(out / "s1_prob.nii.gz").dataobj)
    first = next(row for row in lesions if row["scan"] == "s1.nii.gz")
    assert 0.5 < float(first["max_probability"]) <= float(probability.max())
    page = (out / "qc/index.html").read_text()
    assert page.count("<tr class=") == 2 and "s1.nii.gz" in page and "s2.nii.gz" in page
    assert 'src="../s1_qc.png"' in page
    assert f">{summary.results[0].lesions}</td>" in page
    # a rerun reuses every output and still writes the same report
    before = (out / "lesion_report_scans.csv").read_text()
    again = predict_folder(scans, out, runs[0], threshold=0.5, min_lesion_size=0, qc=True, save_probabilities=True,
                           progress=False)
    assert len(again.skipped) == 2 and (out / "lesion_report_scans.csv").read_text() == before
    assert (out / "qc/index.html").read_text().count("<tr class=") == 2


def test_ensemble_averages_members(scans, runs, tmp_path):
    single = []
    for index, run in enumerate(runs):
        predict_folder(scans, tmp_path / f"m{index}", run, save_probabilities=True, progress=False)
        single.append(np.asarray(nib.load(tmp_path / f"m{index}/s1_prob.nii.gz").dataobj, dtype=np.float64))
    summary = predict_folder(scans, tmp_path / "ens", list(runs), save_probabilities=True, progress=False)
    averaged = np.asarray(nib.load(tmp_path / "ens/s1_prob.nii.gz").dataobj)
    assert np.array_equal(averaged, (0.5 * single[0] + 0.5 * single[1]).astype(np.float32))
    record = read_sidecar(tmp_path / "ens/s1_mask.nii.gz")
    assert [m["sha256"] for m in record["models"]] == [sha256_file(run / "best.pt") for run in runs]
    assert record["settings"]["threshold"] == pytest.approx(0.5)  # mean of the members' 0.4 and 0.6
    assert record["settings"]["min_lesion_size"] == 6.0  # mean of the members' 3 and 9 mm³
    mask = np.asarray(nib.load(tmp_path / "ens/s1_mask.nii.gz").dataobj)
    assert summary.results[0].lesions is not None and set(np.unique(mask)) <= {0, 1}
    result = CliRunner().invoke(app, ["predict", "-i", str(scans), "-o", str(tmp_path / "ens"), "--model", str(runs[0]),
                                      "--model", str(runs[1]), "--save-probabilities"])
    assert result.exit_code == 0 and "0 done, 2 skipped" in result.output  # the same ensemble: reused


# --- train, config, CLI ------------------------------------------------------------------------


def test_train_refuses_an_existing_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    check_run_folder(run, resume=False, overwrite=False)  # empty: fine
    (run / "best.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="holds a run already .best.pt.: continue it with --resume"):
        train(tmp_path / "never-read.json", 0, run, load_config("tiny"), device="cpu")
    check_run_folder(run, resume=False, overwrite=True)
    check_run_folder(run, resume=True, overwrite=False)
    result = CliRunner().invoke(app, ["train", "--manifest", str(tmp_path / "m.json"), "--fold", "0", "-o", str(run)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (run / "best.pt").read_bytes() == b"x"


def test_user_yaml_is_layered_on_a_base(tmp_path):
    default, tiny = load_config("default"), load_config("tiny")
    few = tmp_path / "few.yaml"
    few.write_text("optim:\n  lr: 0.001\n")
    config = load_config(few)
    assert config.optim.lr == 0.001
    assert config.model_dump(exclude={"optim"}) == default.model_dump(exclude={"optim"})
    assert config.optim.epochs == default.optim.epochs
    on_tiny = tmp_path / "on_tiny.yaml"
    on_tiny.write_text("base: tiny\nseed: 7\n")
    assert load_config(on_tiny).model_dump(exclude={"seed"}) == tiny.model_dump(exclude={"seed"})
    bare = tmp_path / "bare.yaml"
    bare.write_text("base: none\n")
    from pipelines.config import TrainConfig

    assert load_config(bare) == TrainConfig()
    chained = tmp_path / "chained.yaml"
    chained.write_text("base: on_tiny.yaml\noptim:\n  epochs: 2\n")
    assert (load_config(chained).seed, load_config(chained).optim.epochs) == (7, 2)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)


def test_config_typos_suggest_the_key():
    with pytest.raises(ConfigError, match="unknown key optim.epoch: did you mean optim.epochs"):
        load_config("tiny", ["optim.epoch=3"])
    result = CliRunner().invoke(app, ["train", "--manifest", "m.json", "--fold", "0", "--out", "r", "netwrk.width=1"])
    assert result.exit_code == 1 and "unknown key netwrk: did you mean network?" in result.output


@pytest.mark.parametrize("argv", [[], ["predict"], ["train"], ["evaluate"], ["models"], ["manifest"], ["manifest", "build"],
                                  ["export"], ["demo"], ["rerun"], ["synth"], ["inflate"]])
def test_dash_h_is_help(argv):
    result = CliRunner().invoke(app, [*argv, "-h"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_models_lists_checkpoints(runs):
    result = CliRunner().invoke(app, ["models", str(runs[0].parent), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert str(runs[0] / "best.pt") in result.output and sha256_file(runs[0] / "best.pt")[:12] in result.output
    empty = CliRunner().invoke(app, ["models", "--no-cache"])
    assert empty.exit_code == 0 and "No trained model ships with planar3d" in empty.output


def test_output_that_is_a_file_and_text_model_are_one_line(scans, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "-i", str(scans), "-o", str(tmp_path / "p"), "--model", str(text)])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: {text}: not a planar3d checkpoint (refused by the safe loader)"]
    for argv in (["predict", "-i", str(scans), "--output", str(text), "--model", str(text)],
                 ["evaluate", "--pred", str(scans), "--ref", str(scans), "--output", str(text)],
                 ["train", "--manifest", str(text), "--fold", "0", "--output", str(text)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {text}: output exists and is not a folder"]
