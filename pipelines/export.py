"""``planar3d export``: a trained model as TorchScript, ONNX, or a MONAI bundle.

- ``torchscript``: ``model.ts`` from ``torch.jit.script`` (any input size; the network pads and
  crops itself), with the checkpoint's preprocessing and threshold embedded as the extra file
  ``planar3d.json``.
- ``onnx``: ``model.onnx`` (opset from the dynamo exporter) with batch and spatial sizes
  dynamic, preprocessing metadata in the model's ``metadata_props``. Needs the ``onnx`` extra.
- ``bundle``: a MONAI bundle folder (``configs/metadata.json``, ``configs/inference.json``,
  ``models/model.pt``, ``docs/README.md``). ``models/model.pt`` is the full ``planar3d-model/1``
  checkpoint (weights plus the preprocessing they need); ``inference.json`` runs
  :func:`pipelines.predict.predict_folder` on ``input_dir``, so
  ``python -m monai.bundle run --config_file configs/inference.json --input_dir IN --output_dir OUT``
  writes exactly the masks ``planar3d predict`` writes.

Every export only carries the *network*: preprocessing (RAS reorientation, intensity
normalisation with the recorded method and parameters), thresholding and small-lesion removal are in ``planar3d predict`` and in the
bundle; users of the TorchScript/ONNX files must apply them as recorded in the metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict

import monai
import nibabel
import numpy
import torch

from planar3d.checkpoint import ModelCheckpoint, load_model
from planar3d.errors import ConfigError, Planar3DError
from planar3d.io import atomic_write, atomic_write_text, check_output_folder, make_folder, make_parent_folder, write_json

FORMATS = ("torchscript", "onnx", "bundle")


def _metadata(checkpoint: ModelCheckpoint) -> Dict[str, object]:
    """What a user of the bare network needs: the checkpoint without weights and training record."""
    data = checkpoint.to_dict()
    return {key: data[key] for key in ("network", "normalization", "orientation", "threshold", "inference")}


def _example_input(checkpoint: ModelCheckpoint) -> torch.Tensor:
    multiple = checkpoint.network.size_multiple()
    return torch.zeros(2, checkpoint.network.in_channels, *[2 * m + 1 for m in multiple])


def export_torchscript(model_path: str | Path, out: str | Path) -> Path:
    model, checkpoint = load_model(model_path)
    scripted = torch.jit.script(model)
    out = make_parent_folder(out)
    with atomic_write(out, "wb") as stream:
        torch.jit.save(scripted, stream, _extra_files={"planar3d.json": json.dumps(_metadata(checkpoint), allow_nan=False)})
    return out


def export_onnx(model_path: str | Path, out: str | Path) -> Path:
    try:
        import onnx
    except ImportError:
        raise Planar3DError("ONNX export needs the onnx extra: pip install 'planar3d[onnx]'") from None
    model, checkpoint = load_model(model_path)
    example = _example_input(checkpoint)
    auto = torch.export.Dim.AUTO
    out = make_parent_folder(out)
    temporary = out.with_name(f".{out.name}.partial.onnx")
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes={"x": {0: auto, 2: auto, 3: auto, 4: auto}}, verbose=False,
        )
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = "planar3d", json.dumps(_metadata(checkpoint), allow_nan=False)
        onnx.save(proto, str(temporary))
        temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)
    return out


def export_bundle(model_path: str | Path, out_dir: str | Path) -> Path:
    from planar3d import __version__

    from pipelines.predict import resolve_checkpoint

    checkpoint_path = resolve_checkpoint(model_path)
    _, checkpoint = load_model(checkpoint_path)  # refuses a checkpoint that does not build
    out_dir = make_folder(out_dir)
    for folder in ("configs", "models", "docs"):
        make_folder(out_dir / folder)
    with atomic_write(out_dir / "models" / "model.pt", "wb") as stream, open(checkpoint_path, "rb") as source:
        shutil.copyfileobj(source, stream)
    versions = checkpoint.training.get("versions") or {}  # provenance; absent in hand-made checkpoints
    metadata = {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by planar3d {__version__}"},
        "monai_version": versions.get("monai") or monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"planar3d": __version__, "nibabel": nibabel.__version__},
        "name": "planar3d MS lesion segmentation (planar 3D res-u-net)",
        "task": "Segmentation of multiple-sclerosis lesions in raw FLAIR MRI",
        "description": "Planar 3D transfer learning (VGG-16 encoder with planar kernels). Runs planar3d's predict pipeline: exact RAS reorientation, the checkpoint's intensity normalisation, sliding window, threshold, small-lesion removal; masks in each scan's own geometry.",
        "authors": "planar3d",
        "copyright": "see the planar3d license",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR (FLAIR)", "num_channels": checkpoint.network.in_channels,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [], "is_patch_data": False,
                                 "channel_def": {"0": "FLAIR"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": ["*", "*", "*"],
                                 "dtype": "uint8", "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "lesion"}}},
        },
        "planar3d": _metadata(checkpoint),
    }
    inference = {
        "imports": ["$import torch", "$from pipelines.predict import predict_folder",
                    "$from planar3d.networks import PlanarResUNetConfig"],
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "input_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "network_def": {"_target_": "planar3d.networks.PlanarResUNet",
                        "config": "$PlanarResUNetConfig.from_dict(@network_config)"},
        "network_config": checkpoint.network.to_dict(),
        "tta": False,
        "min_lesion_size": float(checkpoint.min_lesion_size),  # chosen on validation with the threshold
        "run": ["$predict_folder(@input_dir, @output_dir, @ckpt_path, device=@device, tta=@tta, min_lesion_size=@min_lesion_size, progress=False)"],
    }
    write_json(out_dir / "configs" / "metadata.json", metadata)
    write_json(out_dir / "configs" / "inference.json", inference)
    atomic_write_text(out_dir / "docs" / "README.md", (
        "# planar3d bundle\n\nRun on a folder of FLAIR NIfTI scans (planar3d must be installed):\n\n"
        "```bash\npython -m monai.bundle run --config_file configs/inference.json "
        "--meta_file configs/metadata.json --bundle_root . --input_dir /data/scans --output_dir /output/masks\n```\n\n"
        "Masks (`<scan>_mask.nii.gz`, uint8) have each scan's own shape, affine and orientation.\n"))
    return out_dir


def export_model(run_or_checkpoint: str | Path, format: str, out: str | Path | None = None) -> Path:
    """Export in one of :data:`FORMATS`; default output next to the run (``<run>/export/...``)."""
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    source = Path(run_or_checkpoint)
    base = (source if source.is_dir() else source.parent) / "export"
    if source.exists():  # else the missing checkpoint is the error to report, and nothing is created
        target = Path(out) if out is not None else base / ("bundle" if format == "bundle" else "model")
        check_output_folder(target if format == "bundle" else target.parent)  # before the model loads
    if format == "torchscript":
        return export_torchscript(_checkpoint(source), out or base / "model.ts")
    if format == "onnx":
        return export_onnx(_checkpoint(source), out or base / "model.onnx")
    return export_bundle(source, out or base / "bundle")


def _checkpoint(source: Path) -> Path:
    from pipelines.predict import resolve_checkpoint

    return resolve_checkpoint(source)
