"""Export from every accepted source: tf.keras model and .h5, .keras file, SavedModels."""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from export_models import (  # noqa: E402
    TOL,
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    randomize_biases,
    randomize_bn,
    run_onnx,
)

import bnexport  # noqa: E402


def _tf_keras_model():
    import tf_keras  # the [legacy] extra, part of [test]

    tl = tf_keras.layers
    inp = tf_keras.Input((10, 10, 3), name="image")
    x = tl.Conv2D(6, 3, name="conv")(inp)
    x = tl.BatchNormalization(name="bn")(x)
    x = tl.ReLU()(x)
    x = tl.DepthwiseConv2D(3, name="dw")(x)
    x = tl.BatchNormalization(name="bn_dw")(x)
    x = tl.GlobalAveragePooling2D()(x)
    x = tl.Dense(4, name="dense")(x)
    x = tl.BatchNormalization(name="bn_dense")(x)
    model = tf_keras.Model(inp, x)
    randomize_bn(model)
    randomize_biases(model)
    return model


EXPECTED_TF_KERAS = {
    "bn": "folded_forward",
    "bn_dw": "folded_forward",
    "bn_dense": "folded_forward",
}


def test_tf_keras_model_in_memory(tmp_path):
    model = _tf_keras_model()
    path = tmp_path / "tfk.onnx"
    report = bnexport.export(model, path)
    assert report.source == "tf_keras"
    assert {r.name: r.action for r in report.records} == EXPECTED_TF_KERAS
    assert bn_derived_nodes(path) == []
    assert_matches_keras(path, model, image_feed("image", (10, 10, 3)))


def test_h5_file(tmp_path):
    model = _tf_keras_model()
    h5 = tmp_path / "model.h5"
    model.save(h5)
    path = tmp_path / "h5.onnx"
    report = bnexport.export(str(h5), path)
    assert {r.name: r.action for r in report.records} == EXPECTED_TF_KERAS
    assert_matches_keras(path, model, image_feed("image", (10, 10, 3)))


def test_keras_file_with_nested_model(tmp_path):
    L = keras.layers
    inner_in = keras.Input((8, 8, 4))
    y = L.Conv2D(4, 3, padding="same", name="inner_conv")(inner_in)
    y = L.BatchNormalization(name="inner_bn")(y)
    inner = keras.Model(inner_in, L.ReLU()(y), name="block")
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 1, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    out = inner(x)
    model = keras.Model(inp, out)
    randomize_bn(model)
    randomize_biases(model)
    file = tmp_path / "m.keras"
    model.save(file)
    path = tmp_path / "k.onnx"
    report = bnexport.export(str(file), path)
    assert report.source == "keras"
    assert {r.name: r.action for r in report.records} == {
        "stem_bn": "folded_forward",
        "inner_bn": "folded_forward",
    }
    assert bn_derived_nodes(path) == []
    assert_matches_keras(path, model, image_feed("image", (8, 8, 3)))


class _FusedBnModule(tf.Module):
    """A plain tf.Module: conv -> FusedBatchNormV3 (inference) -> relu; no Keras metadata."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 5)).astype(np.float32))
        self.gamma = tf.Variable(rng.uniform(0.5, 1.5, 5).astype(np.float32))
        self.beta = tf.Variable(rng.normal(0, 0.3, 5).astype(np.float32))
        self.mean = tf.Variable(rng.normal(0, 0.5, 5).astype(np.float32))
        self.var = tf.Variable(rng.uniform(0.3, 2.0, 5).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 9, 9, 3], tf.float32, name="img")])
    def __call__(self, x):
        y = tf.nn.conv2d(x, self.w, 1, "SAME")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            y, self.gamma, self.beta, self.mean, self.var, epsilon=1e-3, is_training=False
        )
        return {"out": tf.nn.relu(y)}


def test_saved_model_with_fused_batch_norm(tmp_path):
    module = _FusedBnModule()
    sm = tmp_path / "sm"
    tf.saved_model.save(module, str(sm), signatures=module.__call__)
    path = tmp_path / "sm.onnx"
    report = bnexport.export(str(sm), path)
    assert report.source == "saved_model"
    assert len(report.records) == 1
    assert report.records[0].action == "folded_forward"
    assert "FusedBatchNorm" in report.records[0].name
    assert bn_derived_nodes(path) == []
    feeds = image_feed("img", (9, 9, 3))
    ref = module(tf.constant(feeds["img"]))["out"].numpy()
    # independent NumPy reference of the BN math on TF's conv output
    conv = tf.nn.conv2d(feeds["img"], module.w, 1, "SAME").numpy().astype(np.float64)
    scale = module.gamma.numpy() / np.sqrt(module.var.numpy().astype(np.float64) + 1e-3)
    numpy_ref = np.maximum(conv * scale + module.beta.numpy() - module.mean.numpy() * scale, 0)
    np.testing.assert_allclose(ref, numpy_ref, rtol=1e-5, atol=1e-5)
    (got,) = run_onnx(path, feeds)
    rtol, atol = TOL["float32"]
    assert np.max(np.abs(got - numpy_ref)) <= rtol * np.max(np.abs(numpy_ref)) + atol


def test_saved_model_of_keras_model(tmp_path):
    L = keras.layers
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inp, L.ReLU()(x))
    randomize_bn(model)
    sm = tmp_path / "ksm"
    model.export(str(sm), verbose=False)  # Keras 3: inference SavedModel, no Keras metadata
    path = tmp_path / "ksm.onnx"
    report = bnexport.export(str(sm), path)
    assert report.source == "saved_model"
    # TF's grappler merges this BN's Mul into the conv before tf2onnx sees it; whatever
    # reaches the fold pass must fold, and nothing BN-derived may be left.
    assert all(r.action == "folded_forward" for r in report.records)
    assert bn_derived_nodes(path) == []
    assert [n.op_type for n in onnx.load(path).graph.node].count("Add") == 0
    name = onnx.load(path).graph.input[0].name
    feeds = image_feed(name, (8, 8, 3))
    ref = model(feeds[name], training=False).numpy()
    (got,) = run_onnx(path, feeds)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)) + 1e-5


def test_missing_path_and_unknown_suffix(tmp_path):
    from bnexport.errors import ExportError

    with pytest.raises(ExportError, match="does not exist"):
        bnexport.export(str(tmp_path / "nope.keras"), tmp_path / "x.onnx")
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"0")
    with pytest.raises(ExportError, match="unsupported model file"):
        bnexport.export(str(bogus), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
