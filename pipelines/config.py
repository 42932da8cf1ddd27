"""Typed training configuration (pydantic v2), loaded from YAML with ``key.sub=value`` overrides.

Every section forbids unknown keys, so a typo (``optim.lr_rate``) or a wrong type
(``optim.epochs: ten``) stops the run before anything is done, with the key named and the
closest known keys suggested ("did you mean optim.lr?"). The packaged configs (``default``,
``paper``, ``demo_cpu``, ``tiny``, ``cpu``) live in ``pipelines/configs/`` and are found by name;
see ``docs/training.md`` for the reference of every key. ``cpu`` is ``default`` at a CPU budget:
it names ``default`` as its base and holds only what it changes.

A user's YAML file is layered on a base (:func:`load_layered`): its ``base:`` key names a
packaged config or another YAML file (relative to the file), and **without** ``base:`` the base
is ``default``, the recommended recipe, so a file holding a few keys changes only those keys.
``base: none`` starts from the bare class defaults. Sections merge key by key; lists are replaced.

Example:
    >>> config = load_config("demo_cpu", ["optim.epochs=3", "loss.name=bce_dice"])
    >>> config.optim.epochs, config.loss.name
    (3, 'bce_dice')
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from planar3d.augment import ScannerAugmentation
from planar3d.errors import ConfigError
from planar3d.networks.res_unet import PlanarResUNetConfig
from planar3d.preprocess import NormalizationConfig
from planar3d.sampling import BRIGHTNESS_FACTOR
from planar3d.thresholds import CRITERIA

PACKAGED_CONFIGS = ("default", "paper", "demo_cpu", "tiny", "cpu")
#: The base of a user's YAML file without a ``base:`` key (the recommended recipe).
DEFAULT_BASE = "default"
#: ``base:`` value meaning no base: the class defaults.
NO_BASE = "none"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class NetworkSection(PlanarResUNetConfig):
    """The network (:class:`planar3d.networks.PlanarResUNetConfig`, which checks every value), with
    ``plane_axis`` and ``pool_across_planes`` ``"auto"`` by default: :meth:`resolve` fills them in
    from the first training scan."""

    in_channels: Literal[1, 3] = 1
    out_channels: Literal[1] = 1
    plane_axis: Union[Literal["auto"], Literal[0, 1, 2]] = "auto"  # type: ignore[assignment]
    pool_across_planes: Union[Literal["auto"], List[bool]] = "auto"  # type: ignore[assignment]

    def __post_init__(self):
        self.resolve(0 if self.plane_axis == "auto" else self.plane_axis, (True,) * 4)  # checks the other values

    def resolve(self, plane_axis: int, pools: Sequence[bool]) -> PlanarResUNetConfig:
        """The network config, with the ``auto`` entries replaced by ``plane_axis`` and ``pools``."""
        values = {f.name: getattr(self, f.name) for f in fields(PlanarResUNetConfig)}
        if self.plane_axis == "auto":
            values["plane_axis"] = plane_axis
        values["pool_across_planes"] = tuple(pools if self.pool_across_planes == "auto" else self.pool_across_planes)
        return PlanarResUNetConfig(**values)


class EncoderSection(_Section):
    """Transferred encoder: weight source and freezing schedule."""

    weights: str = "imagenet"
    freeze_epochs: int = Field(-1, ge=-1)


class HardNegativeSection(_Section):
    """Hard-negative patch centres (:class:`planar3d.sampling.PatchCentreIndicesd`): bright
    non-lesion voxels, optionally weighted by the case's brain mask."""

    brightness_factor: float = Field(BRIGHTNESS_FACTOR, gt=0)
    margin: int = Field(2, ge=0)
    # brain_mask: the sidecar planar3d synth writes (planar3d.data.synth.brain_mask_path); a
    # case without one is sampled without weights, and the run says which cases those are
    prior: Optional[Literal["brain_mask"]] = "brain_mask"
    # weight of a bright voxel outside the brain mask, against 1 inside: 0 never shows the
    # network the scalp or the skull base as a hard negative (the brain-mask prior alone)
    outside_weight: float = Field(0.0, ge=0, le=1)
    # extra weight of grey matter inside the brain mask: a bright voxel's weight is
    # mask x (1 + grey_matter_weight x its grey-matter fraction), from the grey_matter/ sidecar
    # planar3d synth writes (planar3d.data.synth.grey_matter_path); 0: the brain mask alone
    grey_matter_weight: float = Field(0.0, ge=0)

    @field_validator("grey_matter_weight")
    @classmethod
    def _grey_matter_needs_brain_mask(cls, value: float, info) -> float:
        if value > 0 and info.data.get("prior") != "brain_mask":
            raise ValueError("grey_matter_weight weights the brain-mask prior: it needs prior: brain_mask")
        return value


class DataSection(_Section):
    """Sampling of training patches and data loading."""

    sampling: Literal["slabs", "lesion", "lesion_hard_negative"] = "lesion"
    slab_planes: int = Field(16, ge=1)
    patch_size: List[int] = [96, 96, 48]
    pos_neg_ratio: float = Field(1.0, ge=0)
    ratios: List[float] = [1.0, 1.0, 1.0]  # lesion_hard_negative: lesion, hard-negative, random patches
    hard_negative: HardNegativeSection = HardNegativeSection()
    samples_per_volume: int = Field(2, ge=1)
    batch_size: int = Field(2, ge=1)
    cache: Literal["memory", "disk", "none"] = "memory"
    num_workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = 0
    # monai: MONAI transforms in DataLoader workers; device: volumes kept as tensors, patches cut and
    # augmented on the training device (pipelines/device_batches.py); auto: device when training on
    # CUDA, monai on the CPU (resolve_loader)
    loader: Literal["auto", "monai", "device"] = "monai"
    # monai loader: one DataLoader with persistent workers for the run (pipelines/loader_workers.py)
    persistent_workers: bool = False

    @field_validator("patch_size")
    @classmethod
    def _three_sizes(cls, value):
        if len(value) != 3 or any(v == 0 or v < -1 for v in value):
            raise ValueError("must be 3 sizes (positive, or -1 for the whole axis)")
        return value

    @field_validator("ratios")
    @classmethod
    def _three_ratios(cls, value):
        if len(value) != 3 or any(v < 0 for v in value) or sum(value) <= 0:
            raise ValueError("must be 3 non-negative numbers (lesion, hard_negative, random), not all 0")
        return value


@dataclass(frozen=True)
class ScannerSection(ScannerAugmentation):
    """Scanner-variation augmentation (:class:`planar3d.augment.ScannerAugmentation`, which
    checks every value): thick slices, blur, bias field, histogram, gamma, noise."""

    __pydantic_config__ = ConfigDict(extra="forbid")


class AugmentationSection(_Section):
    """Random augmentation (MONAI ``Rand*d`` transforms); a probability of 0 disables one."""

    flip_prob: float = Field(0.5, ge=0, le=1)
    affine_prob: float = Field(0.2, ge=0, le=1)
    rotate_degrees: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0, lt=1)
    gamma_prob: float = Field(0.2, ge=0, le=1)
    gamma_range: List[float] = [0.7, 1.5]
    bias_field_prob: float = Field(0.2, ge=0, le=1)
    bias_field_coeff: float = Field(0.3, ge=0)
    noise_prob: float = Field(0.1, ge=0, le=1)
    noise_std: float = Field(0.05, ge=0)
    # null: none; a mapping (may be {}): planar3d.augment.scanner_augmentation after the above
    scanner: Optional[ScannerSection] = None


class OptimSection(_Section):
    """Optimiser, epochs and learning-rate schedule."""

    name: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(100, ge=1)
    scheduler: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    poly_power: float = Field(0.9, gt=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    # stop when nothing has been predicted in the training patches for this many epochs after the
    # warm-up under a Dice-only loss (a collapse it cannot leave; pipelines.train.check_not_collapsed); 0 = never
    collapse_epochs: int = Field(3, ge=0)


class LossSection(_Section):
    """Loss by name (see :mod:`planar3d.losses`) and its options."""

    name: Literal["bce_dice", "dice", "dice_ce", "dice_focal", "tversky", "generalized_dice"] = "dice_ce"
    batch_dice: bool = True
    options: Dict[str, Any] = {}
    # the network's output probability before training (its head's bias, logit of this): near the
    # share of lesion voxels in the training patches, so the loss does not first drive every output
    # to background (PlanarResUNet.set_initial_probability); null = PyTorch's default bias
    initial_probability: Optional[float] = Field(None, gt=0, lt=1)


class ValidationSection(_Section):
    """Whole-volume validation on held-out training cases, with a threshold search."""

    every: int = Field(1, ge=1)
    roi_size: List[int] = [-1, -1, -1]
    overlap: float = Field(0.25, ge=0, lt=1)
    thresholds: List[float] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # minimum lesion sizes (mm³) chosen with the threshold; the pair goes into the checkpoint
    # and is what predict applies unless told otherwise (planar3d.thresholds)
    min_lesion_sizes: List[float] = [3.0]
    # core thresholds chosen with them (hysteresis: components whose highest probability is at
    # most it are dropped; none is always a candidate); empty: no core rule (planar3d.thresholds)
    core_thresholds: List[float] = []
    # what chooses the threshold and the best epoch (planar3d.thresholds.choose_threshold)
    criterion: Literal[CRITERIA] = "lesion_f1"  # type: ignore[valid-type]
    # validation cases of injected sets come from hosts no training case comes from
    # (pipelines.data.split_validation_by_host); the held-out hosts' other cases are set aside
    hold_out_hosts: bool = True
    # a held-out host's validation cases spread over its lesion loads, light ones included
    # (pipelines.data.spread_over_load); false: drawn by the seed
    spread_over_load: bool = True

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, value):
        if not value or any(not 0 < t < 1 for t in value):
            raise ValueError("must be a non-empty list of numbers strictly between 0 and 1")
        return value

    @field_validator("core_thresholds")
    @classmethod
    def _core_in_unit_interval(cls, value):
        if any(not 0 <= h < 1 for h in value):
            raise ValueError("must be numbers in [0, 1)")
        return value

    @field_validator("min_lesion_sizes")
    @classmethod
    def _non_negative(cls, value):
        if not value or any(not m >= 0 for m in value):
            raise ValueError("must be a non-empty list of sizes >= 0 (mm³)")
        return value


class TrainConfig(_Section):
    """The whole training configuration."""

    seed: int = 0
    deterministic: bool = False
    amp: bool = True
    channels_last: bool = True
    val_cases: int = Field(1, ge=0)
    normalization: NormalizationConfig = NormalizationConfig()
    network: NetworkSection = Field(default_factory=NetworkSection)
    encoder: EncoderSection = EncoderSection()
    data: DataSection = DataSection()
    augmentation: AugmentationSection = AugmentationSection()
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    validation: ValidationSection = ValidationSection()

    def to_dict(self) -> dict:
        """Plain JSON-compatible dict (for run.json and checkpoints)."""
        return self.model_dump(mode="json")


def resolve_loader(loader: str, device_type: str) -> str:
    """The training loader ``data.loader`` names on a device of type ``device_type``.

    ``auto`` is ``device`` on CUDA (a GPU step outruns CPU transforms in DataLoader workers,
    issue 10) and ``monai`` elsewhere (on the CPU the network dominates, and the MONAI path is
    the one measured there); ``monai`` and ``device`` are themselves.

    >>> resolve_loader("auto", "cuda"), resolve_loader("auto", "cpu"), resolve_loader("device", "cpu")
    ('device', 'monai', 'device')
    """
    if loader == "auto":
        return "device" if device_type == "cuda" else "monai"
    if loader not in ("monai", "device"):
        raise ConfigError(f"data.loader={loader!r}: expected auto, monai or device")
    return loader


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key (recursively), other values replace."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_layered(source: str | Path, _seen: tuple = ()) -> tuple[str, dict]:
    """``(description, data)`` of a config with its ``base:`` chain resolved (module docstring).

    A packaged config has no base unless it names one (``cpu`` names ``default``); a YAML
    file's ``base:`` (default :data:`DEFAULT_BASE`) is a packaged name, another file (relative
    to this one) or ``none``.

    Raises:
        ConfigError: missing file or base, bad YAML, a base that is not a name, or a cycle.
    """
    where, data = _read_source(source)
    is_file = Path(source).is_file()
    base = data.pop("base", DEFAULT_BASE if is_file else NO_BASE)
    if base is None or str(base).lower() == NO_BASE:
        return where, data
    if not isinstance(base, str):
        raise ConfigError(f"{where}: base must be a packaged config ({', '.join(PACKAGED_CONFIGS)}), a YAML file or none; got {base!r}")
    key = str(Path(source).resolve()) if is_file else str(source)
    if key in _seen:
        raise ConfigError(f"{where}: base chain loops back to {source}")
    base_source: str | Path = base
    if is_file and base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base_source = Path(source).parent / base
    base_where, base_data = load_layered(base_source, _seen + (key,))
    return f"{where} (on base {base_where})", _merge(base_data, data)


def _read_source(source: str | Path) -> tuple[str, dict]:
    """``(description, data)`` of a YAML file path or a packaged config name."""
    path = Path(source)
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        name = str(source)[:-5] if str(source).endswith(".yaml") else str(source)
        packaged = resources.files("pipelines").joinpath("configs", f"{name}.yaml")
        if "/" in name or not packaged.is_file():
            raise ConfigError(
                f"{source}: no such config file, nor a packaged config (packaged: {', '.join(PACKAGED_CONFIGS)})"
            )
        text, where = packaged.read_text(encoding="utf-8"), f"packaged config {name!r}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
    return where, data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set ``key.sub=value`` overrides (values parsed as YAML) in a copy of ``data``."""
    import copy

    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({error})") from None
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def schema_keys(model: Any = None, prefix: str = "") -> List[str]:
    """Every dotted key of the configuration schema (``optim.lr``, ``network.width``, ...)."""
    import dataclasses

    model = TrainConfig if model is None else model
    if isinstance(model, type) and issubclass(model, BaseModel):
        items = [(name, info.annotation) for name, info in model.model_fields.items()]
    elif dataclasses.is_dataclass(model):
        items = [(f.name, f.type) for f in dataclasses.fields(model)]
    else:
        return []
    keys = []
    for name, annotation in items:
        keys.append(prefix + name)
        if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
            keys += schema_keys(annotation, prefix + name + ".")
    return keys


def did_you_mean(key: str) -> List[str]:
    """Known keys close to an unknown dotted ``key`` (difflib), best first.

    Example:
        >>> did_you_mean("optim.lr_rate")[0], did_you_mean("optim.epoch")[0]
        ('optim.lr', 'optim.epochs')
    """
    import difflib

    known = schema_keys()
    parent = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.6)
    return close or difflib.get_close_matches(key, known, n=3, cutoff=0.6)


def validate_config(data: dict, where: str = "config") -> TrainConfig:
    """Validate a dict; :class:`ConfigError` names the source and each bad key, with the closest
    known keys for an unknown one."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        hints = []
        for problem in error.errors():
            if problem.get("type") == "extra_forbidden":
                key = ".".join(str(part) for part in problem.get("loc", ()))
                close = did_you_mean(key)
                hints.append(f"unknown key {key}: " + (f"did you mean {' or '.join(close)}?" if close else
                                                      "see docs/training.md for the keys"))
        raise ConfigError(f"{where}: {error}" + "".join(f"\n{hint}" for hint in hints)) from None


def load_config(source: str | Path = "default", overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config (a file path, layered on its ``base:``, or a packaged name) and apply
    ``key.sub=value`` overrides.

    Raises:
        ConfigError: missing file, bad YAML, unknown keys or wrong types (the key is named).
    """
    where, data = load_layered(source)
    if overrides:
        where = f"{where} with overrides {list(overrides)}"
    return validate_config(apply_overrides(data, overrides), where)
