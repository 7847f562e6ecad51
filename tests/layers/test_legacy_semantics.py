"""The seed's last two tf.keras semantics: Bessel's correction (opt-in) and ``layer.fused``.

``bessel_correction=True`` feeds the moving variance the unbiased batch variance
``var_B · n/(n − 1)``, as tf.keras's fused path does; the default keeps Keras 3's biased
update. Expected moving statistics are computed in NumPy (float64) from the batch, with
``n`` per feature of the batch, of each ghost batch, of the global batch across
replicas, or the mask's sum; tf.keras (tf_keras) is compared directly where its fused
kernel runs. ``layer.fused`` before and after ``build`` is compared with tf.keras's for
a parametrized set of arguments.

Tolerances (float32 layer vs float64 NumPy on unit-scale data): 1e-5 relative on
statistics, ``atol`` 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras  # the [test] extra installs it (also the [legacy] extra)

from bnexport.errors import LayerConfigError
from bnexport.layers.batch_normalization import BatchNormalization, SyncBatchNormalization

STAT = {"rtol": 1e-5, "atol": 1e-6}


# -- the issue's example ------------------------------------------------------------


@pytest.mark.parametrize("bessel,expected", [(False, 0.5), (True, 1.0)])
@pytest.mark.parametrize("fused", [None, False])
def test_issue_example_two_values(bessel, expected, fused):
    """Batch ``[0, 2]``, momentum 0.5, zero init: tf.keras 1.0; Keras 3 0.5."""
    x = np.array([0.0, 2.0], np.float32).reshape(2, 1, 1, 1)
    biased, unbiased = float(np.var([0.0, 2.0])), float(np.var([0.0, 2.0], ddof=1))
    assert expected == 0.5 * 0.0 + 0.5 * (unbiased if bessel else biased)
    layer = BatchNormalization(
        momentum=0.5, moving_variance_initializer="zeros", bessel_correction=bessel, fused=fused
    )
    layer(x, training=True)
    assert layer.fused is (fused is None)  # both the kernel and the plain path
    np.testing.assert_allclose(layer.moving_variance.numpy(), [expected], **STAT)
    legacy = tf_keras.layers.BatchNormalization(momentum=0.5, moving_variance_initializer="zeros")
    legacy(x, training=True)
    assert legacy.fused is True
    np.testing.assert_allclose(legacy.moving_variance.numpy(), [1.0], **STAT)


# -- NumPy reference on every path ----------------------------------------------------


def _expected(x, axes, momentum, vbs=None, mask=None, bessel=True):
    """Moving mean/variance after one step from ones/zeros init, in float64."""
    x = x.astype(np.float64)
    reduce = tuple(i for i in range(x.ndim) if i not in axes)
    groups = 1 if vbs is None else x.shape[0] // vbs
    means, variances = [], []
    for g in range(groups):
        xg = x if vbs is None else x[g * vbs : (g + 1) * vbs]
        w = np.ones_like(xg) if mask is None else np.broadcast_to(mask[..., None], xg.shape)
        if mask is not None and vbs is not None:
            w = np.broadcast_to(mask[g * vbs : (g + 1) * vbs, ..., None], xg.shape)
        n = w.sum(reduce)
        mean = (xg * w).sum(reduce) / n
        shape = [xg.shape[i] if i in axes else 1 for i in range(x.ndim)]
        var = (w * (xg - mean.reshape(shape)) ** 2).sum(reduce) / n
        if bessel:
            var = np.where(n > 1, var * n / np.maximum(n - 1, 1), var)
        means.append(mean)
        variances.append(var)
    batch_mean, batch_var = np.mean(means, 0), np.mean(variances, 0)
    return momentum * 0.0 + (1 - momentum) * batch_mean, momentum * 1.0 + (1 - momentum) * batch_var


CASES = [
    # (input shape, layer kwargs, feature axes): n per statistic in the comment
    ((8, 4, 4, 3), {}, [3]),  # fused kernel, n = 128
    ((8, 4, 4, 3), {"fused": False}, [3]),  # plain ops, n = 128
    ((8, 3, 4, 4), {"axis": 1}, [1]),  # fused NCHW
    ((6, 2, 3, 2, 4), {}, [4]),  # fused rank 5
    ((8, 5), {}, [1]),  # rank 2, plain ops, n = 8
    ((8, 5), {"fused": True}, [1]),  # rank 2 on the kernel
    ((8, 4, 3), {"axis": [1, 2]}, [1, 2]),  # axis list, n = 8
    ((8, 4, 4, 3), {"virtual_batch_size": 2}, [3]),  # ghost batches on the kernel, n = 32
    ((8, 4, 4, 3), {"virtual_batch_size": 4, "fused": False}, [3]),  # plain ghost, n = 64
    ((8, 5), {"virtual_batch_size": 2, "fused": True}, [1]),  # ghost n = 2: the factor 2
]


@pytest.mark.parametrize("shape,kwargs,axes", CASES, ids=[str(c[1]) for c in CASES])
def test_bessel_correction_on_every_path(shape, kwargs, axes, rng):
    x = (rng.normal(size=shape) * 2 + 1).astype("float32")
    vbs = kwargs.get("virtual_batch_size")
    plain = BatchNormalization(momentum=0.7, **kwargs)
    ours = BatchNormalization(momentum=0.7, bessel_correction=True, **kwargs)
    y_plain = plain(x, training=True).numpy()
    y_ours = ours(x, training=True).numpy()
    # the output is normalized with the biased variance either way
    np.testing.assert_allclose(y_ours, y_plain, rtol=1e-6, atol=1e-6)
    for layer, bessel in ((plain, False), (ours, True)):
        mean, var = _expected(x, axes, 0.7, vbs=vbs, bessel=bessel)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, **STAT)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, **STAT)
    # the case discriminates: the two updates differ by more than the tolerance
    assert np.all(ours.moving_variance.numpy() > plain.moving_variance.numpy() * (1 + 1e-4))


def test_bessel_correction_with_a_mask_uses_the_mask_count(rng):
    shape = (6, 5, 3)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=shape[:-1]) > 0.4
    layer = BatchNormalization(momentum=0.5, bessel_correction=True)
    layer(x, training=True, mask=mask)
    mean, var = _expected(x, [2], 0.5, mask=mask)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, **STAT)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, **STAT)


def test_bessel_correction_with_dynamic_ghost_batches(rng):
    """Unknown batch size: the kernel sees the groups as channels (n = v · H · W)."""
    shape = (8, 3, 2, 4)
    layer = BatchNormalization(momentum=0.5, virtual_batch_size=2, bessel_correction=True)
    layer.build(shape)
    fn = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec([None, *shape[1:]], tf.float32)],
    )
    x = rng.normal(size=shape).astype("float32")
    fn(x)
    _, var = _expected(x, [3], 0.5, vbs=2)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, **STAT)


def test_bessel_correction_with_renorm_corrects_the_moving_stddev_only(rng):
    shape = (8, 4, 4, 3)
    x = (rng.normal(size=shape) * 3).astype("float32")
    layer = BatchNormalization(
        momentum=0.5, renorm=True, renorm_momentum=0.5, bessel_correction=True
    )
    layer(x, training=True)
    eps = layer.epsilon
    v = x.astype(np.float64).reshape(-1, 3).var(0)
    n = 8 * 16
    # both stddevs start at sqrt(moving_variance_initializer) = 1
    moving_stddev = 0.5 * 1.0 + 0.5 * np.sqrt(v * n / (n - 1) + eps)
    renorm_stddev = 0.5 * 1.0 + 0.5 * np.sqrt(v + eps)  # biased σ_B
    np.testing.assert_allclose(layer.moving_stddev.numpy(), moving_stddev, **STAT)
    np.testing.assert_allclose(layer.renorm_stddev.numpy(), renorm_stddev, **STAT)
    np.testing.assert_allclose(layer.moving_variance.numpy(), moving_stddev**2 - eps, **STAT)


def test_one_value_per_feature_gives_zero_variance_like_tf_keras():
    x = np.full((1, 1, 1, 2), 3.0, np.float32)
    ours = BatchNormalization(
        momentum=0.5, moving_variance_initializer="zeros", bessel_correction=True
    )
    ours(x, training=True)
    legacy = tf_keras.layers.BatchNormalization(momentum=0.5, moving_variance_initializer="zeros")
    legacy(x, training=True)
    np.testing.assert_array_equal(ours.moving_variance.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(legacy.moving_variance.numpy(), [0.0, 0.0])


@pytest.mark.multi_device
def test_bessel_correction_synchronized_uses_the_global_count(rng):
    """Two replicas holding 3 and 5 examples: n is the global N = 8 · 6 per feature."""
    from test_synchronized import _strategy

    strategy = _strategy()
    shape = (6, 2)
    x = rng.normal(size=(8, *shape)).astype("float32")
    parts = np.split(x, [3])
    with strategy.scope():
        layer = SyncBatchNormalization(momentum=0.5, bessel_correction=True)
        layer.build((None, *shape))
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )
    strategy.run(tf.function(lambda v: layer(v, training=True)), args=(xs,))
    _, var = _expected(x, [2], 0.5)  # the global batch, n = 48
    for value in strategy.experimental_local_results(layer.moving_variance.value):
        np.testing.assert_allclose(value.numpy(), var, rtol=1e-5)


# -- against tf.keras where its fused kernel runs ---------------------------------------

LEGACY_FUSED = [
    ((8, 4, 4, 3), {}),
    ((8, 3, 4, 4), {"axis": 1}),
    ((4, 2, 3, 3, 2), {}),
    ((2, 2, 2, 3), {}),  # n = 8: a factor 8/7
]


@pytest.mark.parametrize("shape,kwargs", LEGACY_FUSED, ids=[str(c) for c in LEGACY_FUSED])
def test_bessel_correction_matches_tf_keras_fused_path(shape, kwargs, rng):
    legacy = tf_keras.layers.BatchNormalization(momentum=0.6, **kwargs)
    ours = BatchNormalization(momentum=0.6, bessel_correction=True, **kwargs)
    keras3 = BatchNormalization(momentum=0.6, **kwargs)
    for step in range(3):
        x = (rng.normal(size=shape) * (step + 1) + step).astype("float32")
        outs = [layer(x, training=True).numpy() for layer in (legacy, ours, keras3)]
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert legacy.fused is True and ours.fused is True
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(ours, name).numpy(), getattr(legacy, name).numpy(), **STAT
        )
    # the default (Keras 3) is not tf.keras here
    assert not np.allclose(keras3.moving_variance.numpy(), legacy.moving_variance.numpy(), **STAT)


def test_bessel_correction_is_serialized_and_validated():
    layer = BatchNormalization(bessel_correction=True)
    config = layer.get_config()
    assert config["bessel_correction"] is True
    assert BatchNormalization.from_config(config).bessel_correction is True
    assert BatchNormalization().get_config()["bessel_correction"] is False
    restored = tf_keras_free_round_trip(layer)
    assert restored.bessel_correction is True
    with pytest.raises(LayerConfigError, match=r"bessel_correction='yes'"):
        BatchNormalization(bessel_correction="yes")


def tf_keras_free_round_trip(layer):
    import keras

    return keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))


# -- layer.fused at construction and after build, as tf.keras ---------------------------


def _adjust(shape):
    return tf.ones([1]), tf.zeros([1])


FUSED_ARGS = [
    {},
    {"fused": False},
    {"fused": True},
    {"virtual_batch_size": 2},
    {"renorm": True},
    {"adjustment": _adjust},
    {"synchronized": True},
    {"axis": [1, 2]},
    {"axis": [1, 3]},
    {"axis": [3]},
    {"axis": (1,)},
    {"axis": 1},
    {"axis": 2},
    {"axis": -2},
    {"axis": 3},
    {"axis": -3},
    {"axis": 4},
    {"dtype": "float64"},
    {"dtype": "mixed_float16"},
    {"dtype": "mixed_bfloat16"},
    {"renorm": True, "fused": False},
    {"virtual_batch_size": 2, "axis": 1},
]


def _ids(kwargs):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kwargs.items()) or "default"


@pytest.mark.parametrize("kwargs", FUSED_ARGS, ids=[_ids(k) for k in FUSED_ARGS])
def test_fused_attribute_follows_tf_keras(kwargs):
    legacy = tf_keras.layers.BatchNormalization(**kwargs)
    ours = BatchNormalization(**kwargs)
    assert ours.fused is legacy.fused, "before build"
    for shape in ((4, 3, 4, 5), (2, 3, 4, 5, 6)):
        legacy = tf_keras.layers.BatchNormalization(**kwargs)
        try:
            legacy.build(shape)
        except ValueError:
            continue  # tf.keras refuses this input; ours may accept it
        ours = BatchNormalization(**kwargs)
        ours.build(shape)
        assert ours.fused is legacy.fused, f"after build on {shape}"


def test_issue_virtual_batch_size_reads_false_and_still_runs_fast(rng):
    layer = BatchNormalization(virtual_batch_size=2)
    assert layer.fused is False  # as tf.keras, before build
    x = rng.normal(size=(4, 3, 3, 2)).astype("float32")
    layer(x, training=True)
    assert layer.fused is False and layer._plan is not None  # the kernel runs inside
    assert layer.get_config()["fused"] is None


def test_small_epsilon_is_a_documented_difference():
    """tf.keras raised ε to 1.001e-5 silently and fused; ours keeps ε and plain ops."""
    legacy = tf_keras.layers.BatchNormalization(epsilon=1e-6)
    ours = BatchNormalization(epsilon=1e-6)
    assert ours.fused is None and legacy.fused is None
    legacy.build((2, 3, 4, 5))
    ours.build((2, 3, 4, 5))
    assert legacy.fused is True and ours.fused is False


def test_fused_reading_follows_a_later_setter():
    layer = BatchNormalization(renorm=True)
    assert layer.fused is False
    layer.fused = True  # our kernel handles renorm: honoured
    assert layer.fused is True
    layer.build((2, 3, 4, 5))
    assert layer.fused is True and layer._plan is not None
