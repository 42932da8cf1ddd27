"""Shared fixtures: small generated weight files and the path to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def vgg16_state():
    """A seeded random VGG-16 state dict in torchvision layout."""
    from planar3d.vgg import VGG16

    torch.manual_seed(0)
    return VGG16().state_dict()


@pytest.fixture
def vgg16_file(tmp_path, vgg16_state):
    """That state dict saved as a .pth file."""
    path = tmp_path / "vgg16_test.pth"
    torch.save(vgg16_state, path)
    return path


def shared_data(relative: str) -> Path:
    """Path of a file under ../shared/data; skips the test when it is not there."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path
