"""VGG-16 weight sources: local files, the hub download path (on generated files), errors."""

import gzip

import pytest
import torch

from planar3d.errors import WeightsError
from planar3d.io import sha256_file
from planar3d.vgg import VGG16, expected_shapes, hub_cache_path, load_vgg16_state_dict


def test_keys_match_torchvision_layout():
    shapes = expected_shapes()
    assert shapes["features.0.weight"] == (64, 3, 3, 3)
    assert shapes["features.28.weight"] == (512, 512, 3, 3)
    assert shapes["classifier.6.weight"] == (1000, 4096)
    assert len(shapes) == 32  # 13 convs + 3 linears, weight and bias each


def test_local_file_loads_exactly(vgg16_file, vgg16_state):
    state, source = load_vgg16_state_dict(vgg16_file)
    assert all(torch.equal(state[k], vgg16_state[k]) for k in vgg16_state)
    assert sha256_file(vgg16_file) in source
    VGG16().load_state_dict(state, strict=True)


def test_none_is_random_and_says_so():
    state, source = load_vgg16_state_dict("none")
    assert "random" in source
    assert set(state) == set(expected_shapes())


def test_missing_and_misshaped_keys_are_listed(tmp_path, vgg16_state):
    del vgg16_state["features.2.weight"]
    vgg16_state["features.5.weight"] = torch.zeros(128, 3, 3, 3)
    vgg16_state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(vgg16_state, path)
    with pytest.raises(WeightsError) as error:
        load_vgg16_state_dict(path)
    message = str(error.value)
    assert str(path) in message
    assert "features.2.weight" in message and "missing" in message
    assert "features.5.weight has shape (128, 3, 3, 3)" in message
    assert "extra.weight" in message


def test_corrupted_archive_is_an_error(tmp_path, vgg16_file):
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(vgg16_file.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="damaged.pth"):
        load_vgg16_state_dict(damaged)


def test_non_state_dict_content_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    with gzip.open(path, "wb") as stream:
        stream.write(b"not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pth"):  # a gzip file, not a torch archive
        load_vgg16_state_dict(path)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_vgg16_state_dict(tensor_only)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_vgg16_state_dict(tmp_path / "absent.pth")


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def published(tmp_path, vgg16_file, prefix=None):
    """Publish the weights under torchvision's naming convention (name carries the hash prefix)."""
    prefix = prefix or sha256_file(vgg16_file)[:8]
    target = tmp_path / "server" / f"vgg16-{prefix}.pth"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(vgg16_file.read_bytes())
    return target.as_uri()


def test_imagenet_download_checks_hash_then_uses_cache(tmp_path, hub_home, vgg16_file, vgg16_state):
    url = published(tmp_path, vgg16_file)
    state, source = load_vgg16_state_dict("imagenet", url=url)
    cached = hub_cache_path(url)
    assert cached.is_file() and str(hub_home) in str(cached)
    assert torch.equal(state["features.0.weight"], vgg16_state["features.0.weight"])
    (tmp_path / "server").joinpath(cached.name).unlink()  # the cache alone must now suffice
    state, _ = load_vgg16_state_dict("imagenet", url=url)
    assert torch.equal(state["features.28.bias"], vgg16_state["features.28.bias"])


def test_download_with_wrong_hash_is_refused_and_not_cached(tmp_path, hub_home, vgg16_file):
    url = published(tmp_path, vgg16_file, prefix="deadbeef")
    with pytest.raises(WeightsError, match="hash"):
        load_vgg16_state_dict("imagenet", url=url)
    assert not hub_cache_path(url).exists()


def test_offline_and_uncached_says_where_to_put_the_file(tmp_path, hub_home):
    url = (tmp_path / "nowhere" / "vgg16-397923af.pth").as_uri()
    with pytest.raises(WeightsError) as error:
        load_vgg16_state_dict("imagenet", url=url)
    assert str(hub_cache_path(url)) in str(error.value)
    assert "put it at" in str(error.value)


def test_damaged_cached_file_is_caught(tmp_path, hub_home, vgg16_file):
    url = published(tmp_path, vgg16_file)
    cached = hub_cache_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\0" * 100)
    with pytest.raises(WeightsError, match="does not start with"):
        load_vgg16_state_dict("imagenet", url=url)
