"""Training-mode parity: Keras training=True vs FusedNorm batch_stats.

Tolerances (fp32): rtol 1e-3, atol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from parity_models import conv_bn_model

from bnexport.parity import training_mode
from bnexport.parity.training_mode import check_training_mode

PATHS = {"reference", "onnxruntime", "lowered"}


@pytest.fixture(scope="module")
def feed():
    return {"image": np.random.default_rng(11).standard_normal((8, 8, 8, 3)).astype(np.float32)}


def _numpy_train_bn(x, gamma, beta, eps, ghost):
    """Independent NumPy: per-channel (last axis) moments per ghost batch of ``ghost`` samples.

    Ghost batch ``g`` holds the contiguous samples ``g*ghost .. g*ghost+ghost-1`` (the
    convention of both the layer and FusedNorm).
    """
    n = x.shape[0]
    v = x.reshape(n // ghost, ghost, *x.shape[1:]).astype(np.float64)
    axes = tuple(range(1, v.ndim - 1))
    mean = v.mean(axis=axes, keepdims=True)
    var = v.var(axis=axes, keepdims=True)
    y = (v - mean) / np.sqrt(var + eps) * gamma + beta
    return y.reshape(x.shape)


def test_keras_bn_training_mode_matches_and_state_is_restored(feed):
    model = conv_bn_model("train_keras")
    before = [np.array(v) for v in model.variables]
    results = check_training_mode(model, feed)
    assert [r.layer for r in results] == ["bn1", "bn2", "bn3"]
    for r in results:
        assert not r.skipped and set(r.comparisons) == PATHS and r.passed, r.to_dict()
        assert r.virtual_batch_size == 0
        for c in r.comparisons.values():
            assert c.max_absdiff < 1e-4
    for v, b in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(np.array(v), b)  # moving stats not updated


def test_ghost_batches_of_bnexport_layer(feed):
    import keras

    from bnexport.layers.batch_normalization import BatchNormalization

    def ghost_bn(name):
        return BatchNormalization(virtual_batch_size=2, name=name)

    model = conv_bn_model("train_ghost", bn_cls=ghost_bn)
    results = check_training_mode(model, feed)
    for r in results:
        assert r.virtual_batch_size == 2 and set(r.comparisons) == PATHS
        assert r.passed, r.to_dict()
    # the premise, independently: Keras output for bn1 equals ghost-batch NumPy moments
    layer = model.get_layer("bn1")
    probe = keras.Model(model.inputs, [layer.input, layer.output])
    saved = [np.array(v) for v in model.variables]
    x, y = (np.asarray(t) for t in probe([feed["image"]], training=True))
    for v, s in zip(model.variables, saved, strict=True):
        v.assign(s)
    ref = _numpy_train_bn(x, np.array(layer.gamma), np.array(layer.beta), layer.epsilon, 2)
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-4)
    whole = _numpy_train_bn(x, np.array(layer.gamma), np.array(layer.beta), layer.epsilon, 8)
    assert np.abs(y - whole).max() > 1e-2  # ghost batches really differ from the whole batch


def test_mismatch_is_detected(feed, monkeypatch):
    model = conv_bn_model("train_bad")
    real = training_mode._params
    monkeypatch.setattr(
        training_mode, "_params", lambda layer, c: tuple(p * 1.1 for p in real(layer, c))
    )
    results = check_training_mode(model, feed)
    assert not any(r.passed for r in results)


def test_frozen_layer_is_skipped(feed):
    model = conv_bn_model("train_frozen")
    model.get_layer("bn2").trainable = False
    results = {r.layer: r for r in check_training_mode(model, feed)}
    assert "trainable=False" in results["bn2"].skipped and results["bn2"].passed
    assert results["bn1"].passed and results["bn1"].comparisons
