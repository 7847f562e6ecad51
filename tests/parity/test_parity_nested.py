"""Per-layer parity reaches layers inside custom ``Layer`` blocks and nested models.

The exporter names such layers by path (``block/conv``); parity records their outputs
while the Keras model runs (their ``call`` is wrapped, then restored) and compares them
with the mapped ONNX tensors. Reference: the Keras forward pass itself; a corrupted
weight inside a block must be named as the first divergence.
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from parity_models import perturb_weight, producer_of

import bnexport
from bnexport.parity.check import check_parity
from bnexport.parity.per_layer import metadata_layer_map

L = keras.layers


class ConvBNBlock(L.Layer):
    """conv → BN → ReLU as a custom layer, as model libraries write blocks."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(filters, 3, padding="same", use_bias=False, name="conv")
        self.bn = L.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


def _model():
    keras.utils.set_random_seed(3)
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(inner_in, ConvBNBlock(6, name="block2")(inner_in), name="backbone")
    x = inp = keras.Input((8, 8, 3), name="image")
    x = ConvBNBlock(4, name="block1")(x)
    x = inner(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, L.Dense(5, name="logits")(x), name="nested")
    rng = np.random.default_rng(4)
    for layer in (model.get_layer("block1").bn, inner.get_layer("block2").bn):
        c = int(layer.moving_mean.shape[0])
        layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
        layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("nested") / "nested.onnx"
    bnexport.export(model, path)
    return model, path


@pytest.fixture(scope="module")
def feed():
    return np.random.default_rng(6).standard_normal((5, 8, 8, 3)).astype(np.float32)


def test_nested_layers_are_compared(exported, feed):
    model, path = exported
    mapping = metadata_layer_map(onnx.load(path))
    nested = [n for n in mapping if "/" in n]
    assert nested, mapping  # the exporter maps layers inside blocks by path
    report = check_parity(model, path, inputs=feed, per_layer=True)
    (b,) = report.backends
    compared = {r.layer for r in b.layers if r.comparison is not None}
    assert set(nested) <= compared, [(r.layer, r.skipped) for r in b.layers]
    assert report.passed
    # the model's layers are left as they were (the capture wrapper is removed)
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())
    np.testing.assert_allclose(
        model(feed, training=False).numpy(), model.predict(feed, verbose=0), atol=1e-6
    )


def test_corrupted_weight_inside_a_block_is_named(exported, feed, tmp_path):
    model, path = exported
    graph = onnx.load(path)
    mapping = metadata_layer_map(graph)
    target = next(n for n in mapping if n.startswith("block2") and n.endswith("bn"))
    node = producer_of(graph, mapping[target])
    assert node.op_type == "Conv"
    perturb_weight(graph, node, delta=0.5)
    bad = tmp_path / "bad.onnx"
    onnx.save(graph, bad)
    report = check_parity(model, bad, inputs=feed, per_layer=True)
    (b,) = report.backends
    assert not report
    first = b.first_failing_layer
    assert first is not None and first.layer.startswith("block2"), [
        (r.layer, r.failed) for r in b.layers
    ]
    by_name = {r.layer: r for r in b.layers}
    assert all(by_name[n].comparison.passed for n in by_name if n.startswith("block1/"))
