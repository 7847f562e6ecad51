"""bnexport.BatchNormalization against the NumPy reference (tests/layers/bn_reference.py).

Tolerances (absolute, on outputs of unit scale; inputs have |mean| <= 3, std <= 3):
float32 1e-4 outputs / 1e-5 relative statistics; float16 2e-2; bfloat16 1e-1
(bfloat16 keeps 8 significant bits: ~4e-3 relative, times |x̂| up to ~4);
float64 1e-10.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from bn_reference import make_reference, randomize

from bnexport.errors import LayerConfigError
from bnexport.layers.batch_normalization import BatchNormalization

F32 = {"atol": 1e-4, "rtol": 1e-4}
STAT32 = {"atol": 1e-5, "rtol": 1e-5}


def build(shape, seed=0, **kwargs):
    layer = BatchNormalization(**kwargs)
    layer.build(shape)
    randomize(layer, seed)
    return layer


# (input shape, layer kwargs): every path — fused (4-D/5-D, NHWC/NCHW, reshaped ranks),
# plain ops (rank 2/3, axis lists, fused=False), renorm, ghost batches
CASES = [
    ((16, 5), {}),
    ((16, 5), {"fused": True}),
    ((8, 6, 4), {}),
    ((8, 6, 4), {"axis": 1, "fused": True}),
    ((8, 4, 4, 3), {}),
    ((8, 4, 4, 3), {"fused": False}),
    ((8, 3, 4, 4), {"axis": 1}),
    ((8, 3, 4, 4), {"axis": None, "data_format": "channels_first"}),
    ((4, 3, 2, 2, 3), {}),
    ((4, 3, 2, 2, 3), {"axis": 1}),
    ((8, 4, 4, 3), {"axis": [1, 3]}),
    ((8, 4, 4, 3), {"axis": [-2, -1], "center": False}),
    ((8, 4, 4, 3), {"scale": False}),
    ((8, 4, 4, 3), {"renorm": True}),
    ((8, 4, 4, 3), {"renorm": True, "fused": False}),
    ((16, 5), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}}),
    ((8, 4, 4, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1}}),
    ((16, 5), {"virtual_batch_size": 4}),
    ((16, 5), {"virtual_batch_size": 4, "fused": True}),
    ((8, 4, 4, 3), {"virtual_batch_size": 2}),
    ((8, 4, 4, 3), {"virtual_batch_size": 4, "fused": False}),
    ((8, 3, 4, 4), {"axis": 1, "virtual_batch_size": 2}),
    ((8, 6, 4), {"virtual_batch_size": 2, "axis": [1, 2]}),
    ((8, 4, 4, 3), {"virtual_batch_size": 4, "renorm": True}),
    ((8, 4, 4, 3), {"virtual_batch_size": 4, "renorm": True, "fused": False}),
]
IDS = [f"{s}-{k}" for s, k in CASES]


@pytest.mark.parametrize("shape,kwargs", CASES, ids=IDS)
def test_training_forward_and_ema_over_steps(shape, kwargs, rng):
    layer = build(shape, momentum=0.8, renorm_momentum=0.7, **kwargs)
    ref = make_reference(layer)
    for step in range(3):
        x = (rng.normal(size=shape) * (1 + step) + step - 1).astype("float32")
        y = layer(x, training=True)
        np.testing.assert_allclose(y.numpy(), ref.train(x), **F32, err_msg=f"step {step}")
        np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, **STAT32)
        np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_variance, **STAT32)
        if layer.renorm:
            np.testing.assert_allclose(layer.renorm_mean.numpy(), ref.renorm_mean, **STAT32)
            np.testing.assert_allclose(layer.renorm_stddev.numpy(), ref.renorm_stddev, **STAT32)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(layer(x, training=False).numpy(), ref.infer(x), **F32)


@pytest.mark.parametrize("shape,kwargs", CASES, ids=IDS)
def test_training_gradients(shape, kwargs, rng):
    layer = build(shape, **kwargs)
    ref = make_reference(layer)
    x = tf.constant((rng.normal(size=shape) * 2 + 1).astype("float32"))
    w = rng.normal(size=shape).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * w)
    params = [v for v in (layer.gamma, layer.beta) if v is not None]
    grads = tape.gradient(loss, [x, *[p.value for p in params]])
    dx, dgamma, dbeta = ref.train_grads(x.numpy(), w)
    np.testing.assert_allclose(grads[0].numpy(), dx, atol=2e-4, rtol=1e-3)
    expected = ([dgamma] if layer.scale else []) + ([dbeta] if layer.center else [])
    for got, want in zip(grads[1:], expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("renorm", [False, True])
def test_float64_gradients_match_finite_differences(renorm, rng):
    """Central differences in float64 (h=1e-6) agree with the tape to 1e-6."""
    shape = (6, 3)
    layer = BatchNormalization(dtype="float64", renorm=renorm, momentum=0.5)
    layer.build(shape)
    randomize(layer)
    x = rng.normal(size=shape) * 2 + 1
    w = rng.normal(size=shape)
    snapshot = [v.numpy() for v in layer.variables]

    def loss(xv):
        for v, s in zip(layer.variables, snapshot, strict=True):
            v.assign(s)  # same pre-step renorm statistics for every evaluation
        return float(np.sum(layer(xv, training=True).numpy() * w))

    xt = tf.constant(x)
    for v, s in zip(layer.variables, snapshot, strict=True):
        v.assign(s)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = tf.reduce_sum(layer(xt, training=True) * w)
    analytic = tape.gradient(out, xt).numpy()
    assert layer(xt, training=True).dtype == tf.float64
    numeric = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(*shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        numeric[idx] = (loss(xp) - loss(xm)) / (2 * h)
    if renorm:
        # r, d are stop-gradient: finite differences see them move, the tape must not.
        ref = make_reference(layer)
        for v, s in zip(layer.variables, snapshot, strict=True):
            v.assign(s)
        ref = make_reference(layer)
        np.testing.assert_allclose(analytic, ref.train_grads(x, w)[0], atol=1e-10)
        assert not np.allclose(analytic, numeric, atol=1e-4)
    else:
        np.testing.assert_allclose(analytic, numeric, atol=1e-6)


@pytest.mark.parametrize(
    "dtype,policy,atol",
    [
        ("float16", "mixed_float16", 2e-2),
        ("bfloat16", "mixed_bfloat16", 1e-1),
        ("float16", "float16", 2e-2),
    ],
)
@pytest.mark.parametrize(
    "shape,kwargs", [((16, 4), {}), ((8, 4, 4, 3), {}), ((8, 3, 4, 4), {"axis": 1, "renorm": True})]
)
def test_16bit_inputs(dtype, policy, atol, shape, kwargs, rng):
    layer = BatchNormalization(dtype=policy, momentum=0.5, **kwargs)
    layer.build(shape)
    randomize(layer)
    assert layer.moving_mean.dtype == "float32" and layer.gamma.dtype == "float32"
    ref = make_reference(layer)
    x32 = (rng.normal(size=shape) * 3 + 2).astype("float32")
    x = tf.cast(x32, dtype)
    y = layer(x, training=True)
    assert y.dtype == dtype
    xq = tf.cast(x, "float64").numpy()  # the reference sees the rounded input
    np.testing.assert_allclose(y.numpy().astype("float64"), ref.train(xq), atol=atol, rtol=atol)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), ref.moving_variance, atol=1e-5, rtol=1e-5
    )
    y = layer(x, training=False)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.numpy().astype("float64"), ref.infer(xq), atol=atol, rtol=atol)


def test_float16_large_values_do_not_overflow():
    layer = BatchNormalization(dtype="mixed_float16")
    x = tf.constant(np.linspace(-6e4, 6e4, 64).reshape(16, 4), tf.float16)
    y = layer(x, training=True).numpy().astype("float64")
    assert np.all(np.isfinite(y)) and np.isfinite(layer.moving_variance.numpy()).all()


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((0, 5), {}),
        ((0, 4, 4, 3), {}),
        ((0, 3, 4, 4), {"axis": 1}),
        ((0, 4, 4, 3), {"renorm": True}),
        ((0, 5), {"virtual_batch_size": 2}),
        ((0, 4, 4, 3), {"fused": False}),
        ((0, 4, 4, 3), {"virtual_batch_size": 2}),
        ((0, 3, 4, 4), {"virtual_batch_size": 2, "axis": 1}),
        ((0, 5), {"virtual_batch_size": 2, "fused": True}),
        ((0, 4, 4, 3), {"virtual_batch_size": 2, "renorm": True}),
    ],
)
def test_zero_size_batch(shape, kwargs):
    layer = build((None, *shape[1:]), **kwargs)
    before = [v.numpy().copy() for v in layer.variables]
    x = tf.zeros(shape)
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(y)
    assert y.shape == shape
    for v, b in zip(layer.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.name)
    grads = tape.gradient(loss, [layer.gamma.value, layer.beta.value])
    for g in grads:
        assert np.all(np.isfinite(g.numpy())) and not np.any(g.numpy())


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_trainable_false_is_inference(kwargs, rng):
    shape = (8, 4, 4, 3)
    layer = build(shape, **kwargs)
    ref = make_reference(layer)
    layer.trainable = False
    x = rng.normal(size=shape).astype("float32")
    before = [v.numpy().copy() for v in layer.variables]
    np.testing.assert_allclose(layer(x, training=True).numpy(), ref.infer(x), **F32)
    for v, b in zip(layer.variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


def test_ghost_batch_inference_equals_plain_layer(rng):
    shape = (8, 4, 4, 3)
    ghost, plain = build(shape, seed=3, virtual_batch_size=4), build(shape, seed=3)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_array_equal(ghost(x).numpy(), plain(x).numpy())
    # and training really differs (sanity: the ghost groups are used)
    assert not np.allclose(ghost(x, training=True).numpy(), plain(x, training=True).numpy())


def test_ghost_batch_must_divide_batch():
    layer = BatchNormalization(virtual_batch_size=3)
    with pytest.raises(LayerConfigError, match=r"virtual_batch_size=3, batch size=8"):
        layer(tf.zeros((8, 4)), training=True)
    fn = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec([None, 4])])
    with pytest.raises(tf.errors.InvalidArgumentError, match="virtual_batch_size`=3"):
        fn(tf.zeros((7, 4)))


def test_adjustment_training_only(rng):
    shape = (8, 5)
    a_s = rng.uniform(0.9, 1.1, size=(5,)).astype("float32")
    a_b = rng.uniform(-0.1, 0.1, size=(5,)).astype("float32")
    seen = []

    def adjustment(dyn_shape):
        seen.append(dyn_shape)
        return tf.constant(a_s), tf.constant(a_b)

    for renorm in (False, True):
        layer = build(shape, adjustment=adjustment, renorm=renorm, momentum=0.5)
        ref = make_reference(layer)
        x = (rng.normal(size=shape) * 2).astype("float32")
        y = layer(x, training=True).numpy()
        np.testing.assert_allclose(y, ref.train(x, adjustment=(a_s, a_b)), **F32)
        np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, **STAT32)
        np.testing.assert_allclose(layer(x).numpy(), ref.infer(x), **F32)
    assert list(seen[0].numpy()) == [8, 5]
    with pytest.warns(UserWarning, match="adjustment.*not serialized"):
        config = layer.get_config()
    assert "adjustment" not in config


def test_ema_update_skip(rng):
    shape = (8, 4, 4, 3)
    for kwargs in ({}, {"renorm": True}, {"fused": False}):
        layer = build(shape, ema_update="skip", **kwargs)
        ref = make_reference(layer)
        before = [v.numpy().copy() for v in layer.variables if not v.trainable]
        x = rng.normal(size=shape).astype("float32")
        np.testing.assert_allclose(
            layer(x, training=True).numpy(), ref.train(x, update=False), **F32
        )
        after = [v.numpy() for v in layer.variables if not v.trainable]
        for a, b in zip(after, before, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fused", [None, False])
def test_ema_updates_inside_tf_function_cond_and_while_loop(fused, rng):
    shape = (8, 4, 4, 3)
    layer = build(shape, momentum=0.5, fused=fused)
    ref = make_reference(layer)
    xs = (rng.normal(size=(3, *shape)) + 2).astype("float32")

    @tf.function
    def loop(xs, flag):
        def body(i, acc):
            y = tf.cond(flag, lambda: layer(xs[i], training=True), lambda: layer(xs[i]))
            return i + 1, acc + tf.reduce_sum(y)

        return tf.while_loop(lambda i, _: i < 3, body, [tf.constant(0), tf.constant(0.0)])

    loop(xs, tf.constant(False))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), ref.moving_mean.astype("float32"))
    loop(xs, tf.constant(True))
    for x in xs:
        ref.train(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, **STAT32)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_variance, **STAT32)


def test_training_tensor_flag_in_graph(rng):
    shape = (8, 5)
    layer = build(shape, momentum=0.5)
    ref = make_reference(layer)
    x = rng.normal(size=shape).astype("float32")
    fn = tf.function(lambda x, t: layer(x, training=t))
    np.testing.assert_allclose(fn(x, tf.constant(False)).numpy(), ref.infer(x), **F32)
    np.testing.assert_allclose(fn(x, tf.constant(True)).numpy(), ref.train(x), **F32)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, **STAT32)


def test_masking_matches_reference(rng):
    shape = (6, 7, 3)
    mask = rng.uniform(size=shape[:-1]) > 0.4
    mask[0, :] = False
    for kwargs in ({}, {"renorm": True}, {"virtual_batch_size": 3}):
        layer = build(shape, momentum=0.5, **kwargs)
        ref = make_reference(layer)
        x = (rng.normal(size=shape) * 2 + 1).astype("float32")
        x[~mask] = 1e3  # masked values must not leak into the statistics
        y = layer(x, training=True, mask=mask).numpy()
        np.testing.assert_allclose(y, ref.train(x, mask=mask), atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, **STAT32)
        np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_variance, **STAT32)


def test_masking_through_a_model(rng):
    inputs = keras.Input((5, 3))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    bn = BatchNormalization(momentum=0.0)
    model = keras.Model(inputs, bn(masked, training=True))
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    x[:, 3:] = 0.0
    model(x)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x[:, :3].reshape(-1, 3).mean(0), **STAT32)


def test_mask_rank_error():
    layer = BatchNormalization()
    with pytest.raises(ValueError, match="mask must have one dimension less"):
        layer(tf.zeros((2, 3, 4)), training=True, mask=tf.ones((2, 3, 4)))


def test_variable_names_and_shapes():
    layer = BatchNormalization(axis=[1, 2], renorm=True)
    layer.build((None, 4, 5, 3))
    names = sorted(v.path.split("/")[-1] for v in layer.variables)
    assert names == sorted(
        [
            "gamma",
            "beta",
            "moving_mean",
            "moving_variance",
            "moving_stddev",
            "renorm_mean",
            "renorm_stddev",
        ]
    )
    assert all(tuple(v.shape) == (4, 5) for v in layer.variables)
    assert layer.axis == [1, 2]
    assert len(layer.trainable_weights) == 2 and len(layer.non_trainable_weights) == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"axis": "x"}, r"axis='x'"),
        ({"axis": []}, r"axis=\[\]"),
        ({"virtual_batch_size": 0}, r"virtual_batch_size=0"),
        ({"virtual_batch_size": 2.5}, r"virtual_batch_size=2.5"),
        ({"ema_update": "collection"}, r"ema_update='collection'"),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 1, "r_min": 0}},
            r"invalid keys.*'r_min' \(did you mean 'rmin'",
        ),
        ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, r"rmax=1.0, rmin=2.0"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1}}, r"dmax=-1"),
        ({"renorm": True, "renorm_clipping": [1, 2]}, r"renorm_clipping=\[1, 2\]"),
        ({"momentum": 1.5}, r"momentum=1.5"),
        ({"fused": "yes"}, r"fused='yes'"),
        ({"fused": True, "synchronized": True}, r"fused=True, synchronized=True"),
        ({"fused": True, "adjustment": lambda s: (1.0, 0.0)}, r"fused=True, adjustment="),
        ({"fused": True, "epsilon": 1e-8}, r"fused=True, epsilon=1e-08"),
        ({"data_format": "NHWC"}, r"data_format='NHWC'"),
        ({"virtual_batch_size": 2, "adjustment": lambda s: (1.0, 0.0)}, r"virtual_batch_size=2"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(LayerConfigError, match=match):
        BatchNormalization(**kwargs)


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({"axis": 4}, (2, 3, 4, 5), r"axis` 4 is out of range.*rank 4"),
        ({"axis": [1, -3]}, (2, 3, 4, 5), r"duplicate"),
        ({"axis": [1, 2], "fused": True}, (2, 3, 4, 5), r"fused=True.*single feature axis"),
        ({"axis": 2, "fused": True}, (2, 3, 4, 5), r"fused=True.*axis=2"),
        ({"axis": [0, 1], "virtual_batch_size": 2}, (4, 3), r"`axis` cannot include 0"),
    ],
)
def test_build_errors(kwargs, shape, match):
    with pytest.raises(LayerConfigError, match=match):
        BatchNormalization(**kwargs).build(shape)


def test_fused_true_with_mask_or_float64_is_an_error():
    layer = BatchNormalization(fused=True)
    with pytest.raises(LayerConfigError, match="fused=True.*mask"):
        layer(tf.ones((2, 3, 4, 5)), training=True, mask=tf.ones((2, 3, 4)))
    with pytest.raises(LayerConfigError, match="fused=True.*float64"):
        BatchNormalization(fused=True, dtype="float64")(tf.ones((2, 3, 4, 5), tf.float64))


@pytest.mark.parametrize("layer_cls", [BatchNormalization, keras.layers.BatchNormalization])
def test_bad_renorm_clipping_key_is_a_value_error_with_keras_wording(layer_cls):
    """Keras 3 users catch ValueError and match Keras's message; ours raises the same."""
    with pytest.raises(ValueError, match=r"Received invalid keys for `renorm_clipping` argument"):
        layer_cls(renorm=True, renorm_clipping={"rmax": 2.0, "r_max": 3.0})


@pytest.mark.parametrize(
    "shape,kwargs,before,resolved",
    [
        ((8, 4, 4, 3), {}, None, True),  # rank 4, last axis: the kernel
        ((8, 3, 4, 4), {"axis": 1}, None, True),  # NCHW
        ((8, 2, 4, 4, 3), {}, None, True),  # rank 5
        ((8, 5), {}, None, False),  # rank 2: plain ops unless asked
        ((8, 5), {"fused": True}, True, True),
        ((8, 4, 4, 3), {"fused": False}, False, False),
        # ruled out by tf.keras's rule before build (test_legacy_semantics.py has the rest)
        ((8, 4, 4, 3), {"synchronized": True}, False, False),
        ((8, 4, 4, 3), {"axis": [1, 3]}, False, False),
        ((8, 4, 4, 3), {"epsilon": 1e-6}, None, False),
    ],
)
def test_fused_is_resolved_by_build_like_tf_keras(shape, kwargs, before, resolved, rng):
    """``layer.fused``: the argument (or tf.keras's early False) before build, True/False after."""
    layer = BatchNormalization(**kwargs)
    assert layer.fused is before
    layer.build(shape)
    assert layer.fused is resolved
    assert layer.get_config()["fused"] is kwargs.get("fused")  # the argument round-trips
    clone = BatchNormalization.from_config(layer.get_config())
    assert clone.fused is before
    clone.build(shape)
    assert clone.fused is resolved
    # the flag tells the truth: the fused path matches the reference like the plain one
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        layer(x, training=True).numpy(), make_reference(layer).train(x), **F32
    )
    with pytest.raises(LayerConfigError, match="before the layer is built"):
        layer.fused = not resolved  # (setting the value it has is a no-op in Keras)


def test_fused_resolved_true_still_accepts_a_mask(rng):
    """``fused=None`` resolved to True falls back to plain ops for a masked call."""
    shape = (4, 3, 5, 2)
    layer = build(shape, seed=3)
    assert layer.fused is True
    x = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=shape[:-1]) > 0.3
    ref = make_reference(layer)
    y = layer(x, training=True, mask=mask).numpy()
    np.testing.assert_allclose(y, ref.train(x, mask=mask), **F32)


def test_large_mean_small_spread_float32(rng):
    """A channel at 1e4 ± 1e-2: the two-pass variance stays accurate in float32."""
    x = (1e4 + rng.normal(size=(64, 3)) * 1e-2).astype("float32")
    for kwargs in ({}, {"fused": False}):
        layer = BatchNormalization(momentum=0.0, **kwargs)
        layer(x, training=True)
        want = x.astype("float64").var(0)
        np.testing.assert_allclose(layer.moving_variance.numpy(), want, rtol=2e-2)


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((8, 4, 4, 3), {"virtual_batch_size": 2}),
        ((8, 3, 4, 4), {"virtual_batch_size": 4, "axis": 1}),
        ((8, 5), {"virtual_batch_size": 2, "fused": True}),
        ((8, 4, 4, 3), {"virtual_batch_size": 2, "fused": False, "renorm": True}),
    ],
)
def test_ghost_batches_with_unknown_batch_size_in_graph(shape, kwargs, rng):
    layer = build(shape, momentum=0.5, **kwargs)
    ref = make_reference(layer)
    fn = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec([None, *shape[1:]], tf.float32)],
    )
    x = (rng.normal(size=shape) + 1).astype("float32")
    np.testing.assert_allclose(fn(x).numpy(), ref.train(x), **F32)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_variance, **STAT32)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 4}, {"axis": 1}])
def test_moving_statistics_under_model_fit(kwargs, rng):
    """Keras's compiled train step updates the statistics once per batch (lr=0 keeps γ/β)."""
    shape = (16, 4, 4, 3)
    inputs = keras.Input(shape[1:])
    bn = BatchNormalization(momentum=0.6, **kwargs)
    model = keras.Model(inputs, bn(inputs))
    randomize(bn)
    ref = make_reference(bn)
    x = (rng.normal(size=(32, *shape[1:])) * 2 + 1).astype("float32")
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, x, batch_size=16, epochs=1, shuffle=False, verbose=0)
    ref.train(x[:16])
    ref.train(x[16:])
    np.testing.assert_allclose(bn.moving_mean.numpy(), ref.moving_mean, **STAT32)
    np.testing.assert_allclose(bn.moving_variance.numpy(), ref.moving_variance, **STAT32)
    np.testing.assert_allclose(model.predict(x, verbose=0), ref.infer(x), **F32)
