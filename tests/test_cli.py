"""The console command: --help, --version and `planar3d inflate`."""

import torch
from typer.testing import CliRunner

from planar3d import __version__
from pipelines.cli import app
from planar3d.inflate import load_encoder_checkpoint
from planar3d.networks import PlanarResUNet, PlanarResUNetConfig

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "inflate" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_inflate_writes_a_safe_loadable_encoder(tmp_path, vgg16_file, vgg16_state):
    out = tmp_path / "encoder.pt"
    result = runner.invoke(app, ["inflate", "--vgg16", str(vgg16_file), "--out", str(out), "--plane-axis", "0"])
    assert result.exit_code == 0, result.output
    assert "7,634,112 parameters" in result.output
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["plane_axis"] == 0 and str(vgg16_file.resolve()) in checkpoint["source"]
    net = PlanarResUNet(PlanarResUNetConfig(plane_axis=0))
    net.load_encoder_state(load_encoder_checkpoint(out)["state_dict"])
    assert torch.equal(net.encoder.blocks[1][2].weight.squeeze(2), vgg16_state["features.7.weight"])


def test_inflate_none_records_random_initialisation(tmp_path):
    out = tmp_path / "random.pt"
    result = runner.invoke(app, ["inflate", "--vgg16", "none", "--out", str(out), "--in-channels", "3"])
    assert result.exit_code == 0, result.output
    assert "random initialisation" in load_encoder_checkpoint(out)["source"]


def test_inflate_bad_file_exits_nonzero_naming_it(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"garbage")
    result = runner.invoke(app, ["inflate", "--vgg16", str(bad), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1
    assert "broken.pth" in result.output
    assert not (tmp_path / "x.pt").exists()
