"""The planar3d-model/1 checkpoint: build, validate, save, load, upgrade, refuse foreign files."""

from __future__ import annotations

import pytest
import torch

from planar3d.checkpoint import MODEL_FORMAT, ModelCheckpoint, load_model, save_checkpoint, upgrade
from planar3d.errors import WeightsError
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig

CONFIG = PlanarResUNetConfig(width=0.0625, plane_axis=1, pool_across_planes=(False, False, True, True))


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return PlanarResUNet(CONFIG).eval()


def _checkpoint(network, **changes) -> ModelCheckpoint:
    values = dict(state_dict=network.state_dict(), network=CONFIG,
                  normalization=NormalizationConfig(method="white_matter_peak"), threshold=0.3,
                  roi_size=(-1, 16, -1), overlap=0.5, training={"epoch": 3})
    values.update(changes)
    return ModelCheckpoint(**values)


def test_save_load_round_trip_gives_the_same_network(tmp_path, network):
    checkpoint = _checkpoint(network)
    checkpoint.save(tmp_path / "run" / "best.pt")
    raw = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert raw["format"] == MODEL_FORMAT
    assert raw["inference"] == {"roi_size": [-1, 16, -1], "overlap": 0.5, "min_lesion_size": 3.0, "core_threshold": None}
    assert raw["network"]["pool_across_planes"] == [False, False, True, True]
    assert "resume" not in raw
    loaded = ModelCheckpoint.load(tmp_path / "run" / "best.pt")
    assert (loaded.network, loaded.normalization, loaded.threshold, loaded.roi_size, loaded.overlap, loaded.training) == (
        CONFIG, NormalizationConfig(method="white_matter_peak"), 0.3, (-1, 16, -1), 0.5, {"epoch": 3})
    model, again = load_model(tmp_path / "run" / "best.pt")
    x = torch.randn(1, 1, 8, 16, 8)
    with torch.no_grad():
        assert torch.equal(model(x), network(x))
    assert again.to_dict().keys() == raw.keys()


def test_resume_entry_travels_and_can_be_dropped(tmp_path, network):
    checkpoint = _checkpoint(network, resume={"epoch": 3})
    checkpoint.save(tmp_path / "last.pt")
    loaded = ModelCheckpoint.load(tmp_path / "last.pt")
    assert loaded.resume == {"epoch": 3}
    assert "resume" not in loaded.without_resume().to_dict() and loaded.resume == {"epoch": 3}


def test_old_checkpoint_without_later_entries_is_upgraded(tmp_path, network):
    old = {"format": MODEL_FORMAT, "state_dict": network.state_dict(), "network": CONFIG.to_dict(),
           "normalization": {k: v for k, v in NormalizationConfig().to_dict().items() if k not in ("method", "white_matter_value")},
           "threshold": 0.4}
    save_checkpoint(old, tmp_path / "old.pt")
    loaded = ModelCheckpoint.load(tmp_path / "old.pt")
    assert loaded.normalization.method == "percentile"  # what checkpoints without a method used
    assert (loaded.roi_size, loaded.overlap, loaded.orientation, loaded.training) == (None, 0.25, "RAS", {})
    assert loaded.min_lesion_size == 3.0  # written before the size was chosen on validation: MSSEG's rule
    assert loaded.core_threshold is None  # written before the core threshold: no core rule
    assert upgrade({"inference": {"roi_size": [8, 8, 8]}})["inference"] == {"roi_size": [8, 8, 8], "overlap": 0.25}


def test_the_minimum_lesion_size_chosen_on_validation_travels(tmp_path, network):
    _checkpoint(network, min_lesion_size=15.0).save(tmp_path / "best.pt")
    assert torch.load(tmp_path / "best.pt", weights_only=True)["inference"]["min_lesion_size"] == 15.0
    assert ModelCheckpoint.load(tmp_path / "best.pt").min_lesion_size == 15.0
    with pytest.raises(WeightsError, match="min_lesion_size -1.0 is not >= 0"):
        _checkpoint(network, min_lesion_size=-1.0)


def test_the_core_threshold_chosen_on_validation_travels(tmp_path, network):
    _checkpoint(network, core_threshold=0.8).save(tmp_path / "best.pt")
    assert torch.load(tmp_path / "best.pt", weights_only=True)["inference"]["core_threshold"] == 0.8
    assert ModelCheckpoint.load(tmp_path / "best.pt").core_threshold == 0.8
    with pytest.raises(WeightsError, match=r"core_threshold 1.0 is not in \[0, 1\)"):
        _checkpoint(network, core_threshold=1.0)


@pytest.mark.parametrize("content", [b"not a model\n", b"PK\x03\x04 broken zip"])
def test_foreign_files_are_refused_in_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as caught:
        ModelCheckpoint.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a planar3d checkpoint") and "\n" not in message


def test_other_checkpoints_and_missing_files_are_refused(tmp_path, vgg16_file):
    with pytest.raises(WeightsError, match=r"vgg16_test\.pth: not a planar3d checkpoint \(expected format"):
        ModelCheckpoint.load(vgg16_file)
    with pytest.raises(WeightsError, match=r"none\.pt: not a planar3d checkpoint \(no such file\)"):
        ModelCheckpoint.load(tmp_path / "none.pt")


def test_bad_entries_are_named(tmp_path, network):
    with pytest.raises(WeightsError, match="threshold 1.5"):
        _checkpoint(network, threshold=1.5)
    with pytest.raises(WeightsError, match="roi_size"):
        _checkpoint(network, roi_size=(0, 1, 1))
    data = _checkpoint(network).to_dict()
    data["network"]["depth"] = 5
    save_checkpoint(data, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"bad\.pt: invalid planar3d-model/1 checkpoint .*depth"):
        ModelCheckpoint.load(tmp_path / "bad.pt")
    data = _checkpoint(network).to_dict()
    del data["threshold"]
    save_checkpoint(data, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="missing threshold"):
        ModelCheckpoint.load(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path, network):
    wider = PlanarResUNetConfig(**{**CONFIG.to_dict(), "width": 0.125})
    ModelCheckpoint(network.state_dict(), wider).save(tmp_path / "mismatch.pt")
    with pytest.raises(WeightsError, match="mismatch.pt: checkpoint does not describe a loadable network"):
        load_model(tmp_path / "mismatch.pt")
