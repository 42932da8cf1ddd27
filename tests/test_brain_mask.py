"""The template masks at prediction (planar3d.brain_mask, predict --brain-mask, --grey-matter-max):
the component rules, the registered ICBM152 masks on a real head, the record and reuse, and failures."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from planar3d.brain_mask import MIN_INSIDE_FRACTION, TemplateMasks, mni152_brain_mask, mni152_masks
from planar3d.checkpoint import ModelCheckpoint
from planar3d.metrics.lesion import components, drop_components_outside
from planar3d.networks import PlanarResUNetConfig
from pipelines.predict import InferenceSettings, lesion_mask, predict_folder
from pipelines.predict_setup import ScanInput
from pipelines.predict_steps import OutputPaths, finish_scan, prepare_scan, run_model
from tests.test_atlas import downsampled_real_head
from tests.test_predict import FixedLogits, _scan, checkpoint, folder  # noqa: F401 (fixtures)


def test_components_mostly_outside_are_dropped_exactly():
    mask = np.zeros((1, 30), bool)
    mask[0, 0:4] = mask[0, 6:10] = mask[0, 12:20] = True      # three components of 4, 4 and 8 voxels
    brain = np.zeros_like(mask)
    brain[0, 0:2] = True     # 2 of 4 inside: exactly half, kept
    brain[0, 6:7] = True     # 1 of 4: dropped
    brain[0, 12:20] = True   # all inside: kept
    labels, n = components(mask)
    kept, m = drop_components_outside(labels, n, brain, 0.5)
    assert m == 2 and MIN_INSIDE_FRACTION == 0.5
    np.testing.assert_array_equal(kept > 0, mask & ~np.isin(np.arange(30), range(6, 10))[None])
    assert sorted(np.unique(kept).tolist()) == [0, 1, 2]  # renumbered
    with pytest.raises(ValueError, match="shape"):
        drop_components_outside(labels, n, brain[:, :10], 0.5)
    probability = mask.astype(np.float32)[..., None] * 0.9
    assert lesion_mask(probability, 0.5, (1, 1, 1), 0.0, brain=brain[..., None])[1] == 2
    assert lesion_mask(probability, 0.5, (1, 1, 1), 0.0)[1] == 3


def test_components_mostly_in_grey_matter_are_dropped_and_the_two_rules_add_up():
    mask = np.zeros((1, 30, 1), bool)
    mask[0, 0:4] = mask[0, 6:10] = mask[0, 12:20] = True      # components of 4, 4 and 8 voxels
    probability = mask.astype(np.float32) * 0.9
    below = np.ones_like(mask)
    below[0, 6:9] = False     # 3 of 4 voxels in grey matter: dropped
    below[0, 12:16] = False   # 4 of 8: exactly half below the limit, kept
    mask_kept, kept = lesion_mask(probability, 0.5, (1, 1, 1), 0.0, below_grey_matter_max=below)
    assert kept == 2
    np.testing.assert_array_equal(mask_kept[0, :, 0], mask[0, :, 0] & ~np.isin(np.arange(30), range(6, 10)))
    brain = np.ones_like(mask)
    brain[0, 0:4] = False     # the first lesion off the brain: the brain rule drops it, the grey-matter rule the second
    mask_kept, kept = lesion_mask(probability, 0.5, (1, 1, 1), 0.0, brain=brain, below_grey_matter_max=below)
    assert kept == 1 and mask_kept[0, :, 0].tolist() == [i in range(12, 20) for i in range(30)]


@pytest.mark.slow
def test_registered_brain_mask_keeps_the_brain_lesion_and_drops_the_one_in_air(tmp_path):
    """Real registration on the real 1 mm head at 4 mm; a lesion in the brain's centre and one in the air."""
    head = downsampled_real_head()
    path = tmp_path / "head.nii.gz"
    nib.save(head, path)
    probability = np.zeros(head.shape, np.float32)
    centre = tuple(s // 2 for s in head.shape)
    probability[centre[0] - 1:centre[0] + 2, centre[1] - 1:centre[1] + 2, centre[2]:centre[2] + 2] = 0.9   # 18 voxels
    probability[0:2, 0:2, 0:2] = 0.9                                                                       # 8 voxels of air
    logits = np.log(probability.clip(1e-6, 1 - 1e-6) / (1 - probability.clip(1e-6, 1 - 1e-6)))
    settings = InferenceSettings(threshold=0.5, min_lesion_size=0.0, brain_mask="mni152")
    prepared = prepare_scan(ScanInput(path, path.relative_to(tmp_path)), settings)
    brain_ml = prepared.brain.sum() * 64 / 1000
    assert 900 < brain_ml < 2000 and prepared.brain[centre] and not prepared.brain[0, 0, 0]
    assert prepared.raw_ras is None and prepared.timings["brain_mask"] > 0  # raw intensities not kept past the mask
    outputs = OutputPaths(tmp_path / "out" / "head_mask.nii.gz")
    stats = finish_scan(prepared, run_model(FixedLogits(logits), prepared, settings), outputs, settings)
    assert stats == {"lesions": 1, "lesion_volume_mm3": pytest.approx(18 * 64.0, rel=1e-5)}  # 4 mm voxels, in float32
    written = nib.load(outputs.mask)
    assert np.array_equal(written.affine, head.affine) and written.shape == head.shape
    assert np.asarray(written.dataobj).sum() == 18 and np.asarray(written.dataobj)[centre]
    record = json.loads(outputs.record.read_text())
    assert record["settings"]["brain_mask"] == "mni152"
    assert record["scan"]["brain_volume_mm3"] == pytest.approx(brain_ml * 1000, rel=1e-5)
    fit = record["scan"]["brain_mask_fit"]
    assert fit["seed"] == 0 and fit["tries"] == 1 and 0 <= fit["share_on_air"] <= 0.05
    row = prepared.report[0]
    assert row.brain_volume_ml == pytest.approx(brain_ml, rel=1e-5)
    assert row.lesion_load_percent_of_brain == pytest.approx(100 * 18 * 64 / (brain_ml * 1000), rel=1e-5)
    # the same mask on the same scan: the registration is seeded
    np.testing.assert_array_equal(mni152_brain_mask(nib.Nifti1Image(prepared.reorientation.forward(np.asarray(head.dataobj, np.float32)),
                                                                    prepared.reorientation.affine)), prepared.brain)


def test_a_fit_that_puts_the_brain_on_air_is_retried_with_the_next_seed(monkeypatch):
    """Fits stand in for the registration: the real head's brain is within 1.2x of the template's
    about the origin (0.2 % of it on air); moved 60 mm it lies 30 % on air."""
    import planar3d.data.atlas as atlas
    from planar3d.brain_mask import SEEDS
    from planar3d.data.register import MAX_BRAIN_ON_AIR
    from scipy import ndimage

    head = downsampled_real_head()
    good = np.diag([1.2, 1.2, 1.2, 1.0])
    moved = good.copy()
    moved[1, 3] = 60.0
    tried = []

    def fits(table):
        def register(image, data=None, seed=0):
            tried.append(seed)
            if isinstance(table[seed], Exception):
                raise table[seed]
            return table[seed]
        return register

    monkeypatch.setattr(atlas, "register_mni152_to_host", fits({0: moved, 1: good, 2: good}))
    expected = ndimage.binary_fill_holes(atlas.prior_in_host(atlas.load_mni152().brain_mask, head, good) >= 0.5)
    fit = {}
    np.testing.assert_array_equal(mni152_brain_mask(head, fit=fit), expected)
    assert tried == [0, 1] and SEEDS == (0, 1, 2) and MAX_BRAIN_ON_AIR == 0.05
    assert fit["seed"] == 1 and fit["tries"] == 2 and fit["share_on_air"] < 0.01
    # the grey matter comes through the fit that was kept (seed 1's), not the first one tried
    tried.clear()
    masks = mni152_masks(head, grey_matter_max=0.5)
    grey = atlas.prior_in_host(atlas.load_mni152().gm, head, good)
    np.testing.assert_array_equal(masks.brain, expected)
    np.testing.assert_array_equal(masks.below_grey_matter_max, grey <= 0.5)
    assert tried == [0, 1] and 0.02 < 1 - masks.below_grey_matter_max[expected].mean() < 0.6  # some of the brain is grey
    assert mni152_masks(head).below_grey_matter_max is None
    monkeypatch.setattr(atlas, "register_mni152_to_host", fits({0: moved, 1: moved, 2: RuntimeError("no points.")}))
    with pytest.raises(ValueError, match=r"lies at best 30% on air \(at most 5% allowed\) after 3 tries"):
        mni152_brain_mask(head)
    monkeypatch.setattr(atlas, "register_mni152_to_host", fits({s: RuntimeError("no points.") for s in SEEDS}))
    with pytest.raises(ValueError, match="registration of the MNI152 template failed: no points."):
        mni152_brain_mask(head)


def test_folder_records_the_brain_mask_and_a_rerun_without_it_redoes_the_scans(folder, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    import planar3d.brain_mask as brain_mask

    # registration is tested above on a real head; here every voxel is "brain", 2 mm³ each
    monkeypatch.setattr(brain_mask, "mni152_masks",
                        lambda image, data=None, fit=None, grey_matter_max=None: TemplateMasks(np.ones(image.shape, bool)))
    out = tmp_path / "out"
    first = predict_folder(folder, out, checkpoint, brain_mask="mni152", progress=False)
    assert len(first.done) == 5
    record = json.loads((out / "z_mask.json").read_text())
    assert record["settings"]["brain_mask"] == "mni152"
    assert record["scan"]["brain_volume_mm3"] == 16 * 12 * 8 * 2.0

    def scan_rows():
        with open(out / "lesion_report_scans.csv", newline="") as handle:
            return {row["scan"]: row for row in csv.DictReader(handle)}

    assert float(scan_rows()["z.nii.gz"]["brain_volume_ml"]) == pytest.approx(16 * 12 * 8 * 2.0 / 1000)
    again = predict_folder(folder, out, checkpoint, brain_mask="mni152", progress=False)
    assert [r.status for r in again.results] == ["skipped"] * 5
    # reused scans keep their brain volume in the report (from the record: no mask file is written)
    assert float(scan_rows()["z.nii.gz"]["brain_volume_ml"]) == pytest.approx(16 * 12 * 8 * 2.0 / 1000)
    without = predict_folder(folder, out, checkpoint, progress=False)
    assert len(without.done) == 5 and all("brain mask mni152, now None" in r.redone for r in without.done)
    assert json.loads((out / "z_mask.json").read_text())["settings"]["brain_mask"] is None


def test_the_grey_matter_rule_is_applied_recorded_and_a_rerun_with_another_limit_redoes_the_scans(
        folder, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    import planar3d.brain_mask as brain_mask

    asked = []

    def masks(image, data=None, fit=None, grey_matter_max=None):
        asked.append(grey_matter_max)  # all brain, and all grey matter: every lesion goes
        return TemplateMasks(np.ones(image.shape, bool), None if grey_matter_max is None else np.zeros(image.shape, bool))

    monkeypatch.setattr(brain_mask, "mni152_masks", masks)
    out = tmp_path / "out"
    brain_only = predict_folder(folder, out, checkpoint, brain_mask="mni152", progress=False)
    assert sum(r.lesions for r in brain_only.done) > 0 and set(asked) == {None}
    grey = predict_folder(folder, out, checkpoint, brain_mask="mni152", grey_matter_max=0.5, progress=False)
    assert len(grey.done) == 5 and all("grey matter max None, now 0.5" in r.redone for r in grey.done)
    assert [r.lesions for r in grey.done] == [0] * 5 and asked[-5:] == [0.5] * 5
    record = json.loads((out / "z_mask.json").read_text())
    assert record["settings"]["grey_matter_max"] == 0.5 and record["settings"]["brain_mask"] == "mni152"
    assert [r.status for r in predict_folder(folder, out, checkpoint, brain_mask="mni152", grey_matter_max=0.5,
                                             progress=False).results] == ["skipped"] * 5
    other = predict_folder(folder, out, checkpoint, brain_mask="mni152", grey_matter_max=0.6, progress=False)
    assert all("grey matter max 0.5, now 0.6" in r.redone for r in other.done)


def test_a_scan_the_template_cannot_register_fails_alone_with_its_reason(tmp_path, checkpoint):  # noqa: F811
    """A 16x12x8 random volume is no head: that scan fails with a one-line reason, the batch goes on."""
    scans = tmp_path / "in"
    _scan(scans / "tiny.nii.gz")
    summary = predict_folder(scans, tmp_path / "out", checkpoint, brain_mask="mni152", progress=False)
    (failed,) = summary.failed
    assert "tiny.nii.gz" in failed.error and "brain mask: registration of the MNI152 template failed" in failed.error
    assert "\n" not in failed.error and "ITK ERROR" not in failed.error and ".hxx" not in failed.error
    assert not (tmp_path / "out" / "tiny_mask.nii.gz").exists()


def test_bad_brain_mask_values(tmp_path, checkpoint):  # noqa: F811
    from pipelines.cli import app
    from planar3d.errors import ConfigError

    result = CliRunner().invoke(app, ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(checkpoint),
                                      "--brain-mask", "hd-bet"])
    assert result.exit_code != 0 and "--brain-mask must be none or mni152, got 'hd-bet'" in result.output
    with pytest.raises(ConfigError, match="brain_mask must be one of mni152"):
        InferenceSettings.from_checkpoint(ModelCheckpoint({}, PlanarResUNetConfig()), brain_mask="hd-bet")


@pytest.mark.parametrize("arguments, message", [
    (["--grey-matter-max", "0.5"], "--grey-matter-max needs --brain-mask mni152: the grey matter comes from the same registered template"),
    (["--brain-mask", "mni152", "--grey-matter-max", "1.5"], "grey_matter_max must be a grey-matter probability in (0, 1), got 1.5"),
    (["--brain-mask", "mni152", "--grey-matter-max", "0"], "grey_matter_max must be a grey-matter probability in (0, 1), got 0.0"),
    (["--brain-mask", "mni152", "--grey-matter-max", "nan"], "grey_matter_max must be a grey-matter probability in (0, 1), got nan"),
])
def test_bad_grey_matter_max_is_refused_in_one_line_before_any_scan(folder, checkpoint, tmp_path, arguments, message):  # noqa: F811
    from pipelines.cli import app

    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["predict", "-i", str(folder), "-o", str(out), "-m", str(checkpoint), *arguments])
    assert result.exit_code == 1 and message in result.output
    assert len([line for line in result.output.splitlines() if message in line]) == 1
    assert not list(out.rglob("*_mask.nii.gz"))


def test_settings_refuse_a_grey_matter_limit_without_the_brain_mask():
    from planar3d.errors import ConfigError

    with pytest.raises(ConfigError, match="grey_matter_max needs brain_mask mni152"):
        InferenceSettings.from_checkpoint(ModelCheckpoint({}, PlanarResUNetConfig()), grey_matter_max=0.5)


def test_the_grey_matter_mask_is_applied_in_ras_order_and_the_mask_written_in_the_scans(tmp_path, monkeypatch):
    """The scan's first axis runs right to left (affine x flipped); grey matter is the RAS left half
    (RAS x index < 8). A lesion at RAS x 2-3 is in it and goes; one at RAS x 12-13 stays, and is
    written at the scan's own x 2-3."""
    import planar3d.brain_mask as brain_mask

    def masks(image, data=None, fit=None, grey_matter_max=None):
        assert np.allclose(np.diag(image.affine)[:3], [1.0, 1.0, 2.0])  # the RAS image, not the scan's order
        below = np.ones(image.shape, bool)
        below[:8] = False
        return TemplateMasks(np.ones(image.shape, bool), below)

    monkeypatch.setattr(brain_mask, "mni152_masks", masks)
    path = _scan(tmp_path / "scan.nii.gz")
    settings = InferenceSettings(threshold=0.5, min_lesion_size=0.0, brain_mask="mni152", grey_matter_max=0.5)
    prepared = prepare_scan(ScanInput(path, path.relative_to(tmp_path)), settings)
    logits = np.full(prepared.volume.shape, -5.0, np.float32)
    logits[2:4, 5:7, 3:5] = 5.0     # RAS left: grey matter
    logits[12:14, 5:7, 3:5] = 5.0   # RAS right: kept
    outputs = OutputPaths(tmp_path / "out" / "scan_mask.nii.gz")
    stats = finish_scan(prepared, run_model(FixedLogits(logits), prepared, settings), outputs, settings)
    assert stats["lesions"] == 1
    written = np.asarray(nib.load(outputs.mask).dataobj)
    expected = np.zeros(written.shape, np.uint8)
    expected[2:4, 5:7, 3:5] = 1     # the scan's x = 15 - RAS x
    np.testing.assert_array_equal(written, expected)
