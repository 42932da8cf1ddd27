"""Training config: strict schema, overrides, packaged configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from planar3d.errors import ConfigError
from pipelines.config import PACKAGED_CONFIGS, TrainConfig, apply_overrides, load_config


@pytest.mark.parametrize("name", PACKAGED_CONFIGS)
def test_packaged_configs_validate(name):
    assert isinstance(load_config(name), TrainConfig)
    assert isinstance(load_config(f"{name}.yaml"), TrainConfig)


def test_paper_config_is_the_published_protocol():
    config = load_config("paper")
    assert config.encoder.weights == "imagenet" and config.encoder.freeze_epochs == -1
    assert config.loss.name == "bce_dice"
    assert config.data.sampling == "slabs" and config.data.slab_planes == 16 and config.data.batch_size == 3
    assert config.optim.name == "adam" and config.optim.lr == pytest.approx(5e-5) and config.optim.epochs == 100
    assert config.network.in_channels == 3


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*optim\.lr_rate"):
        load_config(path)


def test_unknown_top_level_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sed: 1\n")
    with pytest.raises(ConfigError, match="sed"):
        load_config(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"optim\.epochs"):
        load_config(path)


def test_overrides_are_parsed_as_yaml_and_validated():
    config = load_config("demo_cpu", ["optim.lr=0.01", "network.plane_axis=1", "data.patch_size=[32, 32, 8]",
                                      "loss.options={lambda_dice: 2.0}", "network.pool_across_planes=[false, false, true, true]"])
    assert config.optim.lr == 0.01 and config.network.plane_axis == 1
    assert config.data.patch_size == [32, 32, 8]
    assert config.loss.options == {"lambda_dice": 2.0}
    assert config.network.pool_across_planes == [False, False, True, True]
    with pytest.raises(ConfigError, match=r"network\.plane_axis"):
        load_config("demo_cpu", ["network.plane_axis=5"])
    with pytest.raises(ConfigError, match=r"data\.nope"):
        load_config("demo_cpu", ["data.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo_cpu", ["optim.lr"])


def test_override_does_not_modify_input():
    data = {"optim": {"lr": 1.0}}
    assert apply_overrides(data, ["optim.lr=2"])["optim"]["lr"] == 2
    assert data["optim"]["lr"] == 1.0


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config"):
        load_config("does_not_exist")
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_normalization_section_builds_the_checkpoint_normalization():
    from pipelines.config import load_config

    config = load_config("demo_cpu", ["normalization.method=white_matter_peak", "normalization.white_matter_value=0.4"])
    normalization = config.normalization
    assert (normalization.method, normalization.white_matter_value) == ("white_matter_peak", 0.4)
    assert normalization.to_dict() == {**load_config("default", []).normalization.to_dict(),
                                       "method": "white_matter_peak", "white_matter_value": 0.4}


#: The command line of the thirteenth session's measured CPU runs (docs/training.md, "Issue 9,
#: thirteenth session"), on the default config.
MEASURED_CPU_RECIPE = [
    "network.width=0.125", "network.pool_across_planes=[true,true,true,true]", "encoder.weights=none",
    "encoder.freeze_epochs=0", "amp=false", "channels_last=false", "data.patch_size=[64,64,32]",
    "data.samples_per_volume=2", "data.batch_size=4", "data.num_workers=0", "data.loader=monai",
    "optim.warmup_epochs=2", "validation.every=16", "optim.epochs=144", "val_cases=4", "loss.name=dice_ce",
    "optim.lr=0.001", "data.ratios=[1.0,2.0,2.0]",
]


def test_cpu_config_is_the_default_with_the_measured_cpu_budget():
    # Exactly the measured runs' settings, and every other key the default's: a change to the
    # default recipe reaches the cpu config too.
    assert load_config("cpu") == load_config("default", MEASURED_CPU_RECIPE)
    assert load_config("cpu") != load_config("default")


def test_initial_probability_is_a_probability():
    assert load_config("default", ["loss.initial_probability=0.02"]).loss.initial_probability == 0.02
    assert load_config("default", ["loss.initial_probability=null"]).loss.initial_probability is None
    for bad in ("0", "1", "-0.5", "two"):
        with pytest.raises(ConfigError, match=r"loss\.initial_probability"):
            load_config("default", [f"loss.initial_probability={bad}"])


def test_train_help_names_every_packaged_config():
    # The CLI does not import the config module at start-up, so its help lists the names itself.
    import pipelines.cli

    source = Path(pipelines.cli.__file__).read_text()
    assert f"packaged name: {', '.join(PACKAGED_CONFIGS)}." in source
