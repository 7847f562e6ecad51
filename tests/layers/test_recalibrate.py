"""bnexport.recalibrate against statistics computed in NumPy (float64).

Tolerance: rtol 1e-5 (the layers run in float32; statistics are accumulated in float64).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from bnexport.errors import InputError
from bnexport.layers.batch_normalization import BatchNormalization
from bnexport.layers.recalibrate import recalibrate

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _model():
    """x -> Dense -> ours -> ReLU -> [nested: Dense -> keras BN] -> Dropout -> Dense."""
    inner_in = keras.Input((6,))
    inner = keras.Model(
        inner_in,
        keras.layers.BatchNormalization(name="kbn", momentum=0.9)(
            keras.layers.Dense(6, name="d2")(inner_in)
        ),
        name="inner",
    )
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, name="d1")(inputs)
    x = BatchNormalization(name="bn1", momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    x = inner(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _np_bn(x, layer):
    g = layer.gamma.numpy().astype("float64")
    b = layer.beta.numpy().astype("float64")
    return (
        g * (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
        + b
    )


def _dense(x, layer):
    w, b = (v.numpy().astype("float64") for v in layer.weights)
    return x @ w + b


@pytest.fixture
def setup(rng):
    model = _model()
    batches = [(rng.normal(size=(16, 4)) * 3 + 5).astype("float32") for _ in range(5)]
    model(batches[0])
    for layer in (model.get_layer("bn1"), model.get_layer("inner").get_layer("kbn")):
        layer.gamma.assign(rng.uniform(0.5, 1.5, 6))
        layer.beta.assign(rng.normal(size=6))
    return model, batches


def test_sequential_exact_population_statistics(setup):
    model, batches = setup
    bn1, kbn = model.get_layer("bn1"), model.get_layer("inner").get_layer("kbn")
    report = recalibrate(model, iter([(b, None) for b in batches]), steps=4)
    assert list(report) == ["bn1", "inner/kbn"]
    used = np.concatenate(batches[:4]).astype("float64")
    h1 = _dense(used, model.get_layer("d1"))
    np.testing.assert_allclose(bn1.moving_mean.numpy(), h1.mean(0), **TOL)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), h1.var(0), **TOL)
    # layer 2 sees the inference-mode output of the recalibrated layer 1
    h2 = _dense(np.maximum(_np_bn(h1, bn1), 0), model.get_layer("inner").get_layer("d2"))
    np.testing.assert_allclose(kbn.moving_mean.numpy(), h2.mean(0), **TOL)
    np.testing.assert_allclose(kbn.moving_variance.numpy(), h2.var(0), **TOL)
    assert report["bn1"].count == 64
    np.testing.assert_allclose(report["inner/kbn"].variance, h2.var(0), **TOL)
    assert report["bn1"].max_mean_change > 0.1


def test_parallel_is_precise_bn(setup):
    model, batches = setup
    bn1, kbn = model.get_layer("bn1"), model.get_layer("inner").get_layer("kbn")
    recalibrate(model, tf.data.Dataset.from_tensor_slices(np.stack(batches)), mode="parallel")
    means1, vars1, means2, vars2 = [], [], [], []
    g1, b1 = bn1.gamma.numpy(), bn1.beta.numpy()
    for x in batches:
        h1 = _dense(x.astype("float64"), model.get_layer("d1"))
        means1.append(h1.mean(0))
        vars1.append(h1.var(0))
        z = g1 * (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + bn1.epsilon) + b1  # batch statistics
        h2 = _dense(np.maximum(z, 0), model.get_layer("inner").get_layer("d2"))
        means2.append(h2.mean(0))
        vars2.append(h2.var(0))
    np.testing.assert_allclose(bn1.moving_mean.numpy(), np.mean(means1, 0), **TOL)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), np.mean(vars1, 0), **TOL)
    np.testing.assert_allclose(kbn.moving_mean.numpy(), np.mean(means2, 0), **TOL)
    np.testing.assert_allclose(kbn.moving_variance.numpy(), np.mean(vars2, 0), **TOL)


def test_array_data_renorm_conv_and_frozen_layers(rng):
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    bn = BatchNormalization(renorm=True, name="bn")
    frozen = BatchNormalization(name="frozen")
    model = keras.Model(inputs, frozen(bn(x)))
    frozen.trainable = False
    data = (rng.normal(size=(40, 5, 5, 2)) + 2).astype("float32")
    model(data[:2])
    before = frozen.moving_mean.numpy().copy()
    report = recalibrate(model, data, batch_size=16)
    assert list(report) == ["bn"]
    h = model.get_layer("conv")(data).numpy().astype("float64").reshape(-1, 3)
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), **TOL)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(0), rtol=1e-4)
    np.testing.assert_allclose(bn.moving_stddev.numpy(), np.sqrt(h.var(0) + bn.epsilon), rtol=1e-4)
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), before)
    assert "frozen" in recalibrate(model, data, include_frozen=True)


def test_errors_leave_the_model_unchanged(setup):
    model, batches = setup
    bn1 = model.get_layer("bn1")
    before = bn1.moving_mean.numpy().copy()
    with pytest.raises(InputError, match="no batch"):
        recalibrate(model, [], steps=3)
    with pytest.raises(InputError, match="mode"):
        recalibrate(model, batches, mode="ema")
    with pytest.raises(InputError, match="infinite"):
        recalibrate(model, tf.data.Dataset.from_tensors(batches[0]).repeat())
    np.testing.assert_array_equal(bn1.moving_mean.numpy(), before)
    assert "call" not in vars(bn1)  # hooks removed


def test_masked_positions_are_left_out_sequential_model(rng):
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Masking(0.0), BatchNormalization(name="bn")]
    )
    x = rng.uniform(1, 2, size=(20, 5, 3)).astype("float32")
    x[:, 3:] = 0.0
    model(x)
    report = recalibrate(model, x, batch_size=8)
    kept = x[:, :3].reshape(-1, 3).astype("float64")
    assert report["bn"].count == kept.shape[0]
    np.testing.assert_allclose(model.layers[-1].moving_mean.numpy(), kept.mean(0), **TOL)
    np.testing.assert_allclose(model.layers[-1].moving_variance.numpy(), kept.var(0), **TOL)
