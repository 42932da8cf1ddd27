"""Experiment files (``pipelines/experiments/*.yaml``): a typed schema, so misuse fails early.

An experiment names the data (a manifest, or synthetic data generated on the fly), the training
config (a packaged name such as ``paper`` or a YAML path) with overrides, the folds and seeds to
run, and the prediction and evaluation settings. Unknown keys and wrong types are rejected with
the key named, before anything runs.

Example file::

    name: msseg2016_paper
    description: The published protocol.
    data:
      manifest: ../../data_manifests/msseg2016.json   # relative to this file
    train:
      config: paper
      overrides: []
    folds: all            # or a list such as [0, 2]
    seeds: [0]
    predict: {tta: false, min_lesion_size: 3.0}
    evaluate: {min_lesion_size: 3.0}
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planar3d.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticData(_Strict):
    """Generate the data with ``planar3d synth`` into ``<out>/data`` (if not there yet)."""

    cases: int = Field(6, ge=2)
    seed: int = 0
    size: Literal["small", "full"] = "small"
    geometries: List[Literal["3d", "thick"]] = ["3d", "thick"]
    orientations: List[Literal["RAS", "LPS", "LAS"]] = ["RAS", "LPS", "LAS"]


class DataSection(_Strict):
    manifest: Optional[str] = None
    root: Optional[str] = None
    synthetic: Optional[SyntheticData] = None

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if (self.manifest is None) == (self.synthetic is None):
            raise ValueError("give exactly one of data.manifest and data.synthetic")
        return self


class TrainSection(_Strict):
    config: str = "default"
    overrides: List[str] = []
    encoder_weights: Optional[str] = None
    device: Optional[str] = None
    deterministic: bool = True


class PredictSection(_Strict):
    tta: bool = False
    min_lesion_size: Optional[float] = Field(None, ge=0)  # None: each model's, chosen on validation
    threshold: Optional[float] = Field(None, gt=0, lt=1)


class EvaluateSection(_Strict):
    min_lesion_size: float = Field(3.0, ge=0)


class Experiment(_Strict):
    name: str
    description: str = ""
    data: DataSection
    train: TrainSection = TrainSection()
    folds: Union[Literal["all"], List[int]] = "all"
    seeds: List[int] = [0]
    predict: PredictSection = PredictSection()
    evaluate: EvaluateSection = EvaluateSection()
    searched: dict = Field(default_factory=dict, description="Hyper-parameter ranges searched to choose this setting (for the checklist).")


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys to values")
    try:
        return Experiment.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def resolve(path_text: str, experiment_file: Path) -> Path:
    """A path from the experiment file: absolute, or relative to the file's folder."""
    path = Path(path_text).expanduser()
    return path if path.is_absolute() else (experiment_file.parent / path).resolve()
