"""Saving and loading checkpoints: plain dicts, written atomically, read with ``weights_only=True``.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so the safe loader reads it
and no pickled code ever runs. A reader never sees a half-written file: it is written to a temp
file in the same folder and renamed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import torch

from planar3d.errors import WeightsError
from planar3d.io import atomic_write


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as stream:
        torch.save(checkpoint, stream)


def load_checkpoint(path: str | Path, expected_format: Optional[str] = None) -> dict:
    """Read a checkpoint dict with the safe loader; errors name the file and the problem.

    Args:
        path: the file.
        expected_format: when given, the dict's ``"format"`` entry must equal it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise WeightsError(path, f"cannot be read as a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    except Exception as error:  # pickle.UnpicklingError: unsafe or corrupted content
        raise WeightsError(path, f"refused by the safe loader ({type(error).__name__}: {error})") from None
    if expected_format is not None and (not isinstance(checkpoint, dict) or checkpoint.get("format") != expected_format):
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(path, f"not a {expected_format} checkpoint (found {found!r})")
    return checkpoint


MODEL_FORMAT = "planar3d-model/1"
"""A trained model checkpoint. Keys:

- ``format``: this string; ``state_dict``: the network's weights;
- ``network``: :class:`planar3d.networks.PlanarResUNetConfig` as a dict;
- ``normalization``: :class:`planar3d.preprocess.NormalizationConfig` as a dict;
- ``orientation``: axis codes the network saw (``"RAS"``: see :class:`planar3d.preprocess.Reorientation`);
- ``threshold``: probability threshold chosen on validation;
- ``inference``: ``{"roi_size": [x, y, z] or None (whole volume), "overlap": float}``;
- ``training``: the training config, ``epoch``, ``metrics``, ``encoder_source``,
  ``manifest_sha256``, ``seed``, ``versions`` (package versions).
"""


def load_model(path: str | Path, device: str = "cpu"):
    """Build the network stored in a ``planar3d-model/1`` checkpoint and load its weights.

    Returns:
        ``(model in eval mode on device, checkpoint dict)``.
    """
    from planar3d.networks import PlanarResUNet, PlanarResUNetConfig

    checkpoint = load_checkpoint(path, expected_format=MODEL_FORMAT)
    try:
        model = PlanarResUNet(PlanarResUNetConfig.from_dict(checkpoint["network"]))
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (KeyError, ValueError, RuntimeError) as error:
        raise WeightsError(path, f"checkpoint does not describe a loadable network ({error})") from None
    return model.to(device).eval(), checkpoint
