"""The emitter's walk: Keras's private graph runner, nested models, shared layers, inlined
custom layers, the layer map written at emission, and the whole-model fallback.

Numbers are checked against Keras's forward pass within ``export_models.TOL["float32"]``
(``max|onnx − keras| <= 1e-4·max|keras| + 1e-5``), with per-channel random BN statistics.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import keras
import numpy as np
import onnx
import pytest
from export_models import (
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    randomize_biases,
    randomize_bn,
    run_onnx,
)
from keras import layers as L
from keras import ops

import bnexport
from bnexport.errors import ExportError
from bnexport.export.emitter import UnsupportedLayer


def test_private_keras_api_the_walk_relies_on():
    """Fails loudly when Keras changes what the emitter's walk uses (see emitter/walk.py).

    ``Function._run_through_graph(inputs, operation_fn, call_fn)`` (Keras >= 3.4; the
    ``keras`` lower bound in pyproject.toml is above it), ``_nodes_by_depth`` with nodes
    carrying ``operation``/``input_tensors``/``outputs``/``is_input``, and ``Sequential``'s
    ``_functional``.
    """
    from keras.src.ops.function import Function

    params = inspect.signature(Function._run_through_graph).parameters
    assert "call_fn" in params, (
        "keras changed Function._run_through_graph: the Keras-native exporter "
        "(bnexport/export/emitter/walk.py) needs its call_fn argument"
    )
    inp = keras.Input((3,), name="x")
    model = keras.Sequential([inp, L.Dense(2)])
    functional = model._functional  # noqa: SLF001
    assert functional is not None, "keras.Sequential no longer builds _functional"
    nodes = [n for ns in functional._nodes_by_depth.values() for n in ns]  # noqa: SLF001
    assert nodes and all(
        hasattr(n, attr)
        for n in nodes
        for attr in ("operation", "input_tensors", "outputs", "is_input")
    )
    seen = []
    result = functional._run_through_graph(  # noqa: SLF001
        [np.ones((1, 3), np.float32)],
        call_fn=lambda op, *args, **kwargs: seen.append(op) or op(*args, **kwargs),
    )
    assert len(seen) == 1 and tuple(np.asarray(result).shape) == (1, 2)


def _residual_model():
    inp = keras.Input((8, 8, 3), name="image")
    shared = L.Conv2D(3, 3, padding="same", name="shared")
    x = shared(inp)
    x = L.BatchNormalization(name="bn_a")(x)
    x = shared(x)  # the same layer called twice
    x = L.BatchNormalization(name="bn_b")(x)
    inner_in = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 1, name="inner_conv")(inner_in)
    y = L.BatchNormalization(name="inner_bn")(y)
    inner = keras.Model(inner_in, L.ReLU()(y), name="inner")
    x = inner(x)  # a nested Functional model
    head = keras.Sequential([L.GlobalAveragePooling2D(), L.Dense(2, name="fc")], name="head")
    return keras.Model(inp, head(x), name="outer")


def test_nested_models_and_shared_layers(tmp_path):
    model = _residual_model()
    randomize_bn(model)
    randomize_biases(model)
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path, engine="keras")
    assert report.engine == "keras" and report.verify.passed
    assert {r.name: r.action for r in report.records} == {
        "bn_a": "folded_forward",
        "bn_b": "folded_forward",
        "inner_bn": "folded_forward",
    }
    targets = {r.name: r.target for r in report.records}
    assert targets["bn_a"] != targets["bn_b"]  # each call of the shared conv has its own Conv
    assert bn_derived_nodes(path) == []
    assert_matches_keras(path, model, image_feed("image", (8, 8, 3)))


class ResidualBlock(keras.layers.Layer):
    """A custom block of the model-library kind: sublayers and keras.ops in ``call``."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(filters, 3, padding="same", name="conv")
        self.bn = L.BatchNormalization(name="bn")
        self.scale = 0.5

    def call(self, x, training=None):
        y = self.bn(self.conv(x), training=training)
        return ops.relu(ops.add(x, ops.multiply(y, self.scale)))


class RawTensorFlowLayer(keras.layers.Layer):
    """A layer whose ``call`` needs a real backend tensor (not expressible symbolically)."""

    def call(self, x):
        import tensorflow as tf

        return tf.math.cumsum(x, axis=1)


def test_custom_layer_is_inlined(tmp_path):
    inp = keras.Input((6, 6, 4), name="image")
    x = ResidualBlock(4, name="block1")(inp)
    x = ResidualBlock(4, name="block2")(x)
    model = keras.Model(inp, x)
    randomize_bn(model)
    randomize_biases(model)
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path)
    assert report.engine == "keras" and report.fallback_reason == ""
    assert {r.name: r.action for r in report.records} == {
        "block1/bn": "folded_forward",
        "block2/bn": "folded_forward",
    }
    assert_matches_keras(path, model, image_feed("image", (6, 6, 4)))


def _raw_model():
    inp = keras.Input((5, 5, 3), name="image")
    x = L.Conv2D(4, 1, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = RawTensorFlowLayer(name="raw")(x)
    model = keras.Model(inp, x)
    randomize_bn(model)
    return model


def test_unknown_layer_falls_back_for_the_whole_model(tmp_path):
    model = _raw_model()
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path)  # engine="auto"
    assert report.engine == "tf2onnx"
    assert "'raw'" in report.fallback_reason and "RawTensorFlowLayer" in report.fallback_reason
    assert "fallback: layer 'raw'" in report._caption()  # noqa: SLF001 - the CLI's table
    assert report.records[0].action == "folded_forward"
    assert_matches_keras(path, model, image_feed("image", (5, 5, 3)))


def test_engine_keras_refuses_naming_the_layer(tmp_path):
    with pytest.raises(UnsupportedLayer, match=r"layer 'raw': custom layer RawTensorFlowLayer"):
        bnexport.export(_raw_model(), tmp_path / "m.onnx", engine="keras")
    assert not (tmp_path / "m.onnx").exists()


def test_non_tensorflow_backend_has_no_fallback(tmp_path, monkeypatch):
    """On JAX/torch the fallback is a clear error naming the layer (backend simulated)."""
    from bnexport.export.emitter import engine

    monkeypatch.setattr(engine, "keras_backend", lambda: "jax")
    with pytest.raises(ExportError, match=r"layer 'raw'.*needs the TensorFlow backend"):
        bnexport.export(_raw_model(), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="engine='tf2onnx' needs Keras's TensorFlow backend"):
        bnexport.export(_raw_model(), tmp_path / "m.onnx", engine="tf2onnx")


def test_layer_outputs_metadata_is_exact(tmp_path):
    """Every mapped tensor, transposed by its perm, equals that layer's Keras output."""
    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="act")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(3, name="fc")(x)
    model = keras.Model(inp, x)
    randomize_bn(model)
    randomize_biases(model)
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path)
    meta = {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props}
    mapping = meta["bnexport.layer_outputs"]
    perms = meta["bnexport.layer_output_perms"]
    assert mapping == report.layer_outputs
    # the conv folded its BN: the conv's own output no longer exists, the BN's does
    assert "c1" not in mapping and {"bn1", "act", "pool", "flat", "fc"} <= set(mapping)
    assert perms["bn1"] == [0, 2, 3, 1] and "flat" not in perms
    graph = onnx.load(path)
    for name in ("bn1", "act", "pool", "flat"):
        graph.graph.output.append(onnx.ValueInfoProto(name=mapping[name]))
    feeds = image_feed("image", (6, 6, 3))
    got = run_onnx(graph, feeds)[1:]
    probe = keras.Model(inp, [model.get_layer(n).output for n in ("bn1", "act", "pool", "flat")])
    for name, value, ref in zip(
        ("bn1", "act", "pool", "flat"), got, probe(feeds["image"]), strict=True
    ):
        value = value.transpose(perms[name]) if name in perms else value
        np.testing.assert_allclose(value, np.asarray(ref), rtol=1e-4, atol=1e-5, err_msg=name)


def test_emitter_modules_import_no_tensorflow():
    """On JAX/torch nothing the Keras-native path imports may pull in TensorFlow."""
    code = (
        "import sys\n"
        "import bnexport.export.emitter, bnexport.export.emitter.engine\n"
        "import bnexport.export.keras_export, bnexport.export.bn_layers\n"
        "import bnexport.export.passes.fold_batchnorm, bnexport.export.layer_map\n"
        "print(sorted(m for m in ('tensorflow', 'tf2onnx', 'keras') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


class Head(keras.Model):
    """A subclassed model used as a layer: no functional graph, inlined through ``call``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pool = L.GlobalAveragePooling2D()
        self.fc = L.Dense(3, name="fc")

    def call(self, x):
        return ops.sigmoid(self.fc(self.pool(x)))


def test_subclassed_model_inside_a_functional_model(tmp_path):
    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inp, Head(name="head")(x))
    randomize_bn(model)
    randomize_biases(model)
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path)
    assert report.engine == "keras" and report.records[0].action == "folded_forward"
    assert_matches_keras(path, model, image_feed("image", (6, 6, 3)))


def test_no_fold_across_a_nested_boundary_when_the_conv_has_another_reader(tmp_path):
    """Inside the nested model the conv output is read twice (output and an inner add):
    the BN after the nested model must not fold into it."""
    inner_in = keras.Input((6, 6, 3))
    conv = L.Conv2D(3, 1, name="inner_conv")(inner_in)
    inner = keras.Model(inner_in, [conv, L.Add()([conv, inner_in])], name="inner")
    inp = keras.Input((6, 6, 3), name="image")
    a, b = inner(inp)
    out = L.Add(name="sum")([L.BatchNormalization(name="bn")(a), b])
    model = keras.Model(inp, out)
    randomize_bn(model)
    randomize_biases(model)
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path, engine="keras", verify=False)
    assert report.records[0].name == "bn"
    assert_matches_keras(path, model, image_feed("image", (6, 6, 3)))


def test_converter_table_covers_the_keras_applications_layers():
    """The layer classes of keras.applications' BN models (InceptionResNetV2's
    CustomScaleLayer is inlined through its ``call``) and the extras the issue lists."""
    from bnexport.export.emitter.registry import known_layers, known_ops

    layers = {
        "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense", "BatchNormalization",
        "Activation", "ReLU", "Add", "Multiply", "Concatenate", "ZeroPadding2D",
        "Cropping2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
        "Reshape", "Flatten", "Rescaling", "Normalization", "Dropout", "LeakyReLU",
        "UpSampling2D", "LayerNormalization", "Conv2DTranspose",
    }  # fmt: skip
    assert layers <= set(known_layers()), layers - set(known_layers())
    ops_needed = {"Add", "Multiply", "Pad", "Split", "Concatenate", "Reshape", "Transpose"}
    assert ops_needed <= set(known_ops()), ops_needed - set(known_ops())


def test_mixed_precision_model_goes_to_tf2onnx_naming_the_layer(tmp_path):
    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, name="c", dtype="mixed_float16")(inp)
    x = L.Activation("linear", dtype="float32", name="to32")(x)
    model = keras.Model(inp, x)
    with pytest.raises(UnsupportedLayer, match="layer 'c': compute dtype float16"):
        bnexport.export(model, tmp_path / "m.onnx", engine="keras")
    report = bnexport.export(model, tmp_path / "m.onnx", verify=False)
    assert report.engine == "tf2onnx" and "compute dtype float16" in report.fallback_reason
