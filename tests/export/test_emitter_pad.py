"""``ZeroPadding2D`` (and ``keras.ops.pad`` with 0) before a convolution: one ``Conv``.

The emitter writes each padding as an ONNX ``Pad``; the fold pipeline's
``MergePadIntoConvPass`` merges it into the next Conv's ``pads`` (as tf2onnx does), so
the graph has one node less per such padding and an input normalization in front of it
can fold backward into the Conv (EfficientNet's stem).

Each model is exported with ``engine="keras"`` (verification off: the comparison here is
independent of the exporter's) and run in onnxruntime with graph optimizations off against
``model(x, training=False)`` within ``export_models.TOL["float32"]``:
``max|onnx − keras| <= 1e-4·max|keras| + 1e-5``. BN statistics are randomized per channel
(``randomize_bn``), so a pad on the wrong axis or side shows as an O(1) error.
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from export_models import (
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    op_counts,
    randomize_biases,
    randomize_bn,
)
from keras import layers as L
from keras import ops

import bnexport


def _export(model, tmp_path, shape, *, name="x"):
    randomize_bn(model)
    randomize_biases(model)
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path, engine="keras", verify=False)
    assert report.engine == "keras" and report.fallback_reason == ""
    assert_matches_keras(path, model, image_feed(name, shape))
    return report, path


def _conv_pads(path) -> list[list[int]]:
    pads = []
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: a for a in node.attribute}
            assert "auto_pad" not in attrs or attrs["auto_pad"].s == b"NOTSET"
            pads.append(list(attrs["pads"].ints) if "pads" in attrs else [])
    return pads


def test_resnet_stem_is_one_conv(tmp_path):
    """ResNet50's stem: ZeroPadding2D(3) + Conv 7×7 s2 VALID + BN + ReLU, then
    ZeroPadding2D(1) + MaxPool 3×3 s2 (the pool's Pad stays: only Convs take pads)."""
    inp = keras.Input((32, 32, 3), name="x")
    x = L.ZeroPadding2D(3, name="conv1_pad")(inp)
    x = L.Conv2D(8, 7, strides=2, name="conv1_conv")(x)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("relu")(x)
    x = L.ZeroPadding2D(1, name="pool1_pad")(x)
    x = L.MaxPooling2D(3, strides=2)(x)
    report, path = _export(keras.Model(inp, x), tmp_path, (32, 32, 3))
    assert op_counts(path) == {"Transpose": 2, "Conv": 1, "Relu": 1, "Pad": 1, "MaxPool": 1}
    assert _conv_pads(path) == [[3, 3, 3, 3]]
    assert [(r.name, r.action) for r in report.records] == [("conv1_bn", "folded_forward")]


@pytest.mark.parametrize("mean", ["zero", "per_channel"])
def test_efficientnet_stem_normalization(tmp_path, mean):
    """Rescaling → Normalization → ZeroPadding2D(((0,1),(0,1))) → Conv 3×3 s2 VALID → BN.

    With a zero mean (``keras.applications`` without ImageNet weights) the input
    normalization is a per-channel scale and folds backward into the stem Conv: no
    ``Mul`` is left. With a nonzero mean its shift would meet the padded border, so it
    stays one per-channel node and the numbers still match.
    """
    rng = np.random.default_rng(0)
    means = [0.0] * 3 if mean == "zero" else list(rng.normal(0.4, 0.1, 3))
    inp = keras.Input((16, 16, 3), name="x")
    x = L.Rescaling(1 / 255.0)(inp)
    x = L.Normalization(mean=means, variance=list(rng.uniform(0.05, 0.3, 3)))(x)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="stem_conv_pad")(x)
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.Activation("swish")(x)
    report, path = _export(keras.Model(inp, x), tmp_path, (16, 16, 3))
    counts = op_counts(path)
    assert "Pad" not in counts
    assert _conv_pads(path) == [[0, 0, 1, 1]]
    actions = {r.name: r.action for r in report.records}
    assert actions.pop("stem_bn") == "folded_forward"
    if mean == "zero":
        assert actions and set(actions.values()) == {"folded_backward"}
        assert bn_derived_nodes(path) == []
        assert counts == {"Transpose": 2, "Conv": 1, "Sigmoid": 1, "Mul": 1}  # Mul: swish
    else:
        assert actions and set(actions.values()) == {"fused"}
        assert len(bn_derived_nodes(path)) >= 1


@pytest.mark.parametrize("kind", ["depthwise", "separable", "same_conv", "channels_first"])
def test_padding_merges_into_each_conv_kind(tmp_path, kind):
    """MobileNetV2's ZeroPadding2D → DepthwiseConv2D s2, NASNet's → SeparableConv2D (its
    depthwise part takes the pads), a SAME conv (its explicit pads plus the padding's), and
    a channels_first model."""
    if kind == "channels_first":
        inp = keras.Input((4, 11, 11), name="x")
        x = L.ZeroPadding2D(((1, 0), (2, 1)), data_format="channels_first")(inp)
        # stride 1: this channels_first conv with strides=2 followed by BN gives Keras's own
        # TensorFlow-backend forward pass an error of ~0.4 against a NumPy convolution
        # (the ONNX graph matches NumPy to 1e-6, with or without the Pad merged)
        x = L.Conv2D(6, 3, data_format="channels_first", name="c")(x)
        x = L.BatchNormalization(axis=1, name="bn")(x)
        shape = (4, 11, 11)
    else:
        inp = keras.Input((11, 11, 4), name="x")
        x = L.Conv2D(6, 1, name="c0")(inp)
        x = L.BatchNormalization(name="bn0")(x)
        x = L.ZeroPadding2D(((1, 0), (2, 1)))(x)
        if kind == "depthwise":
            x = L.DepthwiseConv2D(3, strides=2, name="c")(x)
        elif kind == "separable":
            x = L.SeparableConv2D(5, 3, strides=2, name="c")(x)
        else:  # 12×14 input, SAME 3×3 s2: TensorFlow pads (0, 1) / (0, 1)
            x = L.Conv2D(5, 3, strides=2, padding="same", name="c")(x)
        x = L.BatchNormalization(name="bn")(x)
        shape = (11, 11, 4)
    report, path = _export(keras.Model(inp, x), tmp_path, shape)
    assert "Pad" not in op_counts(path)
    expected = {
        "depthwise": [[0, 0, 0, 0], [1, 2, 0, 1]],
        "separable": [[0, 0, 0, 0], [1, 2, 0, 1], [0, 0, 0, 0]],
        "same_conv": [[0, 0, 0, 0], [1, 2, 1, 2]],
        "channels_first": [[1, 2, 0, 1]],
    }[kind]
    assert _conv_pads(path) == expected
    assert all(r.action == "folded_forward" for r in report.records)
    assert bn_derived_nodes(path) == []


def test_ops_pad_with_zero_merges_and_with_one_stays(tmp_path):
    """``keras.ops.pad`` in a functional graph: constant 0 merges; constant 1 stays."""
    inp = keras.Input((9, 9, 3), name="x")
    x = L.Conv2D(4, 1, name="c0")(inp)
    a = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    a = L.Conv2D(4, 3, name="ca")(a)
    b = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=1.0)
    b = L.Conv2D(4, 3, name="cb")(b)
    _, path = _export(keras.Model(inp, L.Add()([a, b])), tmp_path, (9, 9, 3))
    assert op_counts(path)["Pad"] == 1
    assert sorted(_conv_pads(path)) == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_padding_shared_or_before_average_pool_stays(tmp_path):
    """One padded tensor read by two convs, and a padding before AveragePooling2D (whose
    average over padded zeros ONNX's ``pads`` would compute differently): Pads stay."""
    inp = keras.Input((10, 10, 3), name="x")
    x = L.Conv2D(4, 1, name="c0")(inp)
    p = L.ZeroPadding2D(1)(x)
    a = L.Conv2D(4, 3, name="ca")(p)
    b = L.Conv2D(4, 3, name="cb")(p)
    q = L.ZeroPadding2D(1)(x)
    c = L.AveragePooling2D(3, strides=1)(q)
    out = L.Concatenate()([a, b, c])
    _, path = _export(keras.Model(inp, out), tmp_path, (10, 10, 3))
    assert op_counts(path)["Pad"] == 2
    assert _conv_pads(path) == [[0, 0, 0, 0]] * 3
