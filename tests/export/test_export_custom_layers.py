"""Models built from custom ``Layer`` subclasses: found, patched, folded, numerically equal.

Blocks written the way model libraries write them — a residual block, a squeeze-excite
block and a grouped-convolution block as ``keras.layers.Layer`` subclasses with their own
``call``, nested in each other and reused — must export like functional models: every BN
is found (named by its path), grouped convolutions inside them are converted to one
``Conv(group=g)``, every foldable BN is folded (no BatchNormalization left), and the ONNX
graph matches ``model(x, training=False)`` within ``export_models.TOL["float32"]``
(``max|onnx − keras| <= 1e-4·max|keras| + 1e-5``, onnxruntime optimizations off).
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
from export_models import (
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    op_counts,
    randomize_biases,
    randomize_bn,
)

import bnexport
from bnexport.layers.walk import bn_layers, display_names, walk_layers

L = keras.layers


class ConvBN(L.Layer):
    """conv → BN → (ReLU): the smallest custom block."""

    def __init__(self, filters, kernel=3, strides=1, groups=1, relu=True, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(
            filters, kernel, strides, padding="same", groups=groups, use_bias=False, name="conv"
        )
        self.bn = L.BatchNormalization(name="bn")
        self.relu = relu

    def call(self, x, training=None):
        y = self.bn(self.conv(x), training=training)
        return keras.ops.relu(y) if self.relu else y


class SqueezeExcite(L.Layer):
    """Squeeze-excite: ``x · sigmoid(W2·relu(W1·mean(x)))`` with a BN inside the gate."""

    def __init__(self, channels, ratio=4, **kwargs):
        super().__init__(**kwargs)
        self.reduce = L.Conv2D(max(1, channels // ratio), 1, use_bias=False, name="reduce")
        self.bn = L.BatchNormalization(name="bn")
        self.expand = L.Conv2D(channels, 1, name="expand")

    def call(self, x, training=None):
        s = keras.ops.mean(x, axis=(1, 2), keepdims=True)
        s = keras.ops.relu(self.bn(self.reduce(s), training=training))
        return x * keras.ops.sigmoid(self.expand(s))


class ResidualBlock(L.Layer):
    """Basic residual block of custom sub-blocks (nested two deep), optional SE."""

    def __init__(self, filters, strides=1, groups=1, se=False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides = filters, strides
        self.a = ConvBN(filters, 3, strides, groups=1, name="a")
        self.b = ConvBN(filters, 3, 1, groups=groups, relu=False, name="b")
        self.se = SqueezeExcite(filters, name="se") if se else None
        self.proj = None

    def build(self, input_shape):
        if self.strides != 1 or input_shape[-1] != self.filters:
            self.proj = ConvBN(self.filters, 1, self.strides, relu=False, name="proj")

    def call(self, x, training=None):
        y = self.b(self.a(x, training=training), training=training)
        if self.se is not None:
            y = self.se(y, training=training)
        shortcut = x if self.proj is None else self.proj(x, training=training)
        return keras.ops.relu(y + shortcut)


class Stage(L.Layer):
    """Blocks held in a list (tracked through the list, as Keras does)."""

    def __init__(self, filters, blocks, groups=1, se=False, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [
            ResidualBlock(filters, 2 if i == 0 else 1, groups, se, name=f"block{i}")
            for i in range(blocks)
        ]

    def call(self, x, training=None):
        for block in self.blocks:
            x = block(x, training=training)
        return x


def _finish(model, seed=0):
    randomize_bn(model, seed)
    randomize_biases(model, seed + 1)
    return model


def _backbone(groups=1, se=False, name="custom_net"):
    inp = keras.Input((16, 16, 3), name="image")
    x = ConvBN(8, 3, name="stem")(inp)
    x = Stage(16, 2, groups=groups, se=se, name="stage1")(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(5, name="logits")(x)
    return _finish(keras.Model(inp, out, name=name))


def _bn_count(model) -> int:
    return len(bn_layers(model))


def test_walker_reaches_every_nested_bn_once_with_stable_paths():
    model = _backbone(se=True)
    paths = [p for p, _ in bn_layers(model)]
    assert paths == [
        "stem/bn",
        "stage1/block0/a/bn",
        "stage1/block0/b/bn",
        "stage1/block0/se/bn",
        "stage1/block0/proj/bn",
        "stage1/block1/a/bn",
        "stage1/block1/b/bn",
        "stage1/block1/se/bn",
    ]
    assert paths == [p for p, _ in bn_layers(model)]  # same order every walk
    names = display_names(model)
    assert [names[id(layer)] for _, layer in bn_layers(model)] == paths
    ids = [id(layer) for _, layer in walk_layers(model)]
    assert len(ids) == len(set(ids))


def test_residual_blocks_as_custom_layers_fold_and_match(tmp_path):
    model = _backbone()
    path = tmp_path / "res.onnx"
    report = bnexport.export(model, path)
    s = report.summary
    assert s["total"] == _bn_count(model) == 1 + 2 * 2 + 1
    assert s["folded_forward"] == s["total"], report.records
    assert [r.name for r in report.records] == [p for p, _ in bn_layers(model)]
    assert bn_derived_nodes(path) == []
    assert "BatchNormalization" not in op_counts(path)
    assert_matches_keras(path, model, image_feed("image", (16, 16, 3)))


def test_squeeze_excite_block_folds_and_matches(tmp_path):
    model = _backbone(se=True)
    path = tmp_path / "se.onnx"
    report = bnexport.export(model, path)
    assert report.summary["total"] == _bn_count(model) == 8
    assert report.summary["folded_forward"] == 8, report.records
    assert {"stage1/block0/se/bn", "stage1/block1/se/bn"} <= {r.name for r in report.records}
    assert "BatchNormalization" not in op_counts(path)
    assert_matches_keras(path, model, image_feed("image", (16, 16, 3)))


def test_grouped_conv_nested_in_custom_layers_is_patched(tmp_path):
    model = _backbone(groups=4)
    path = tmp_path / "grouped.onnx"
    report = bnexport.export(model, path)
    counts = op_counts(path)
    assert "StatefulPartitionedCall" not in counts
    groups = [
        {a.name: a.i for a in n.attribute}.get("group", 1)
        for n in onnx.load(path).graph.node
        if n.op_type == "Conv"
    ]
    assert groups.count(4) == 2  # block0/b and block1/b
    assert report.summary["folded_forward"] == report.summary["total"] == 6
    assert "BatchNormalization" not in counts
    assert_matches_keras(path, model, image_feed("image", (16, 16, 3)))


def test_reused_custom_block_is_one_layer_two_calls(tmp_path):
    inp = keras.Input((8, 8, 6), name="image")
    block = ResidualBlock(6, name="shared")
    x = block(block(inp))  # the same object twice: same weights, same BNs
    x = L.GlobalAveragePooling2D()(x)
    model = _finish(keras.Model(inp, L.Dense(3)(x)))
    assert _bn_count(model) == 2
    path = tmp_path / "reused.onnx"
    report = bnexport.export(model, path)
    assert sorted({r.name for r in report.records}) == ["shared/a/bn", "shared/b/bn"]
    assert len(report.records) == 4  # one record per call
    assert all(r.action == "folded_forward" for r in report.records)
    assert "BatchNormalization" not in op_counts(path)
    assert_matches_keras(path, model, image_feed("image", (8, 8, 6)))


def test_custom_block_in_nested_model_and_sequential(tmp_path):
    inner_in = keras.Input((16, 16, 8))
    inner = keras.Model(inner_in, ResidualBlock(8, se=True, name="blk")(inner_in), name="inner")
    model = keras.Sequential(
        [keras.Input((16, 16, 3), name="image"), ConvBN(8, name="stem"), inner], name="seq"
    )
    _finish(model)
    assert _bn_count(model) == 4
    path = tmp_path / "nested.onnx"
    report = bnexport.export(model, path)
    assert report.summary["folded_forward"] == 4, report.records
    # layers of the nested model are named without the model's name
    assert [r.name for r in report.records] == ["stem/bn", "blk/a/bn", "blk/b/bn", "blk/se/bn"]
    feed = image_feed(next(iter(report.inputs)), (16, 16, 3))
    assert_matches_keras(path, model, feed)


def test_recalibrate_and_training_mode_see_nested_bns():
    """The same walk feeds recalibrate and the training-mode parity check."""
    from bnexport.layers.recalibrate import _find_bn_layers
    from bnexport.parity.training_mode import iter_bn_layers

    model = _backbone(se=True)
    expected = [id(layer) for _, layer in bn_layers(model)]
    assert [id(layer) for layer in _find_bn_layers(model).values()] == expected
    assert [id(layer) for layer in iter_bn_layers(model)] == expected
    x = np.zeros((1, 16, 16, 3), np.float32)
    assert model(x).shape == (1, 5)


def test_recalibrate_reaches_bn_inside_custom_block():
    """``recalibrate`` sets the nested ``stem/bn`` to the population moments (NumPy ref).

    Reference: mean and biased variance over (N, H, W) of ``stem.conv(x)`` in float64;
    tolerance ``rtol=1e-5, atol=1e-6`` (float32 conv outputs, float64 accumulation).
    """
    model = _backbone(se=True)
    x = np.random.default_rng(0).normal(size=(64, 16, 16, 3)).astype(np.float32)
    changed = bnexport.recalibrate(model, x, batch_size=16)
    assert set(changed) == {p for p, _ in bn_layers(model)}
    stem = model.get_layer("stem")
    y = np.asarray(stem.conv(x), np.float64)
    np.testing.assert_allclose(stem.bn.moving_mean.numpy(), y.mean((0, 1, 2)), 1e-5, 1e-6)
    np.testing.assert_allclose(stem.bn.moving_variance.numpy(), y.var((0, 1, 2)), 1e-5, 1e-6)


class _Inner(L.Layer):
    def call(self, x):
        import tensorflow as tf

        return tf.math.lgamma(tf.abs(x) + 1.0)  # no ONNX equivalent in tf2onnx


class _Outer(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(3, 1, name="conv")
        self.inner = _Inner(name="inner")

    def call(self, x):
        return self.inner(self.conv(x))


def test_unconvertible_op_names_the_nested_layer(tmp_path):
    import pytest

    from bnexport.errors import ExportError

    inp = keras.Input((8, 8, 3), name="image")
    model = keras.Model(inp, _Outer(name="blk")(L.BatchNormalization(name="bn")(inp)))
    out = tmp_path / "lgamma.onnx"
    with pytest.raises(ExportError) as info:
        bnexport.export(model, out)
    message = str(info.value)
    assert message.startswith("layer 'blk/inner': tf2onnx cannot convert TF op 'Lgamma'")
    assert "\n" not in message and not out.exists()


class DepthwiseBN(L.Layer):
    """Depthwise conv (multiplier 2) → BN inside a custom layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dw = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")
        self.bn = L.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.dw(x), training=training))


def test_depthwise_conv_nested_in_custom_layer_folds(tmp_path):
    inp = keras.Input((10, 10, 4), name="image")
    x = DepthwiseBN(name="dwblock")(inp)
    model = _finish(keras.Model(inp, L.GlobalAveragePooling2D()(x)))
    path = tmp_path / "dw.onnx"
    report = bnexport.export(model, path)
    assert [(r.name, r.action) for r in report.records] == [("dwblock/bn", "folded_forward")]
    counts = op_counts(path)
    assert "StatefulPartitionedCall" not in counts and "BatchNormalization" not in counts
    assert_matches_keras(path, model, image_feed("image", (10, 10, 4)))
