"""Synchronized statistics under MirroredStrategy on two logical CPU devices.

The result of two replicas must equal one layer seeing the global batch: outputs,
input gradients, summed γ/β gradients and moving statistics, to float32 tolerance
(1e-5 absolute / 1e-4 relative on unit-scale values).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from bn_reference import make_reference, randomize

from bnexport.layers.batch_normalization import (
    BatchNormalization,
    SyncBatchNormalization,
)
from bnexport.layers.moments import combine_moments, local_moments, synchronized_moments

TOL = {"atol": 1e-5, "rtol": 1e-4}


_STRATEGY = []


def _strategy():
    """One MirroredStrategy per process: fresh ones would reuse collective instance keys."""
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs 2 logical CPU devices (tests/conftest.py configures them)")
    if not _STRATEGY:
        _STRATEGY.append(tf.distribute.MirroredStrategy([d.name for d in cpus[:2]]))
    return _STRATEGY[0]


def _run_replicas(strategy, layer, parts, weights):
    """One training step per replica; returns per-replica outputs/dx and summed dγ, dβ."""
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )
    ws = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(weights[ctx.replica_id_in_sync_group])
    )

    @tf.function
    def step(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * w)
        dx, dg, db = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        return y, dx, dg, db

    y, dx, dg, db = strategy.run(step, args=(xs, ws))
    local = strategy.experimental_local_results
    sum_ = tf.distribute.ReduceOp.SUM
    return (
        [t.numpy() for t in local(y)],
        [t.numpy() for t in local(dx)],
        strategy.reduce(sum_, dg, axis=None).numpy(),
        strategy.reduce(sum_, db, axis=None).numpy(),
    )


def _single(shape, seed, x, w, **kwargs):
    layer = BatchNormalization(momentum=0.5, **kwargs)
    layer.build(shape)
    randomize(layer, seed)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * w)
    dx, dg, db = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
    return layer, y.numpy(), dx.numpy(), dg.numpy(), db.numpy()


@pytest.mark.multi_device
@pytest.mark.parametrize(
    "sizes,shape,offset,scale,kwargs",
    [
        ((4, 4), (5,), 0.0, 2.0, {}),
        ((4, 4), (3, 3, 2), 1.0, 1.0, {}),
        ((3, 5), (4,), 0.0, 1.0, {}),  # unequal per-replica batches
        ((0, 6), (4,), 0.0, 1.0, {}),  # one replica without examples
        ((4, 4), (3, 3, 2), 0.0, 1.0, {"renorm": True}),
        ((4, 4), (6,), 1e4, 1.0, {}),  # E[x²] − E[x]² cancels here (ulp(1e8) = 8)
    ],
)
def test_two_replicas_equal_one_replica_with_global_batch(rng, sizes, shape, offset, scale, kwargs):
    strategy = _strategy()
    n = sum(sizes)
    x = (offset + rng.normal(size=(n, *shape)) * scale).astype("float32")
    w = rng.normal(size=(n, *shape)).astype("float32")
    parts = np.split(x, [sizes[0]])
    wparts = np.split(w, [sizes[0]])
    single, y1, dx1, dg1, db1 = _single((None, *shape), 7, x, w, **kwargs)
    with strategy.scope():
        layer = SyncBatchNormalization(momentum=0.5, **kwargs)
        layer.build((None, *shape))
    randomize(layer, 7)
    ys, dxs, dg, db = _run_replicas(strategy, layer, parts, wparts)

    # x − μ at |x| = 1e4 resolves 1e-3 (float32 ulp): the outputs inherit that
    tol = {"atol": 4e-3, "rtol": 1e-3} if offset >= 1e3 else TOL
    np.testing.assert_allclose(np.concatenate(ys), y1, **tol)
    np.testing.assert_allclose(np.concatenate(dxs), dx1, atol=max(tol["atol"], 1e-4), rtol=1e-3)
    # summed over the batch: 8 elements x the per-element resolution above
    gtol = {"atol": 1e-2, "rtol": 1e-3} if offset >= 1e3 else {"atol": 1e-4, "rtol": 1e-4}
    np.testing.assert_allclose(dg, dg1, **gtol)
    np.testing.assert_allclose(db, db1, **gtol)
    stol = {"atol": 1e-5, "rtol": 1e-3 if offset >= 1e3 else 1e-5}
    for name in ("moving_mean", "moving_variance"):
        for replica_value in strategy.experimental_local_results(getattr(layer, name).value):
            np.testing.assert_allclose(replica_value.numpy(), getattr(single, name).numpy(), **stol)
    # and both equal the float64 NumPy reference of the global batch
    ref = BatchNormalization(momentum=0.5, **kwargs)
    ref.build((None, *shape))
    randomize(ref, 7)
    np_ref = make_reference(ref)
    np.testing.assert_allclose(y1, np_ref.train(x), atol=max(tol["atol"], 1e-4), rtol=1e-4)
    for replica_value in strategy.experimental_local_results(layer.moving_variance.value):
        np.testing.assert_allclose(replica_value.numpy(), np_ref.moving_variance, rtol=1e-3)
    if offset >= 1e3:
        # the case is discriminating: the naive float32 formula is badly wrong here
        x32 = x.reshape(-1, shape[-1])
        naive = (x32 * x32).mean(0) - x32.mean(0) ** 2
        exact = x.astype("float64").reshape(-1, shape[-1]).var(0)
        assert np.max(np.abs(naive - exact) / exact) > 0.1


#: one feature channel per offset: the claim is "float32-exact at every mean up to 1e4·σ"
OFFSETS = (0.0, -7.0, 1e1, 1e2, 1e3, 3e3, -5e3, 1e4)


def _offset_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 batch ``(64, 4, 4, C)`` whose channel ``c`` has mean ``OFFSETS[c]``, σ = 1."""
    rng = np.random.default_rng(seed)
    x = (np.asarray(OFFSETS) + rng.normal(size=(64, 4, 4, len(OFFSETS)))).astype("float32")
    mask = (rng.random(size=(64, 4, 4, 1)) > 0.3).astype("float32")
    return x, mask


def _old_chan_float32(parts: list[np.ndarray]) -> np.ndarray:
    """The previous formula in float32: Chan's combination of *rounded* per-replica means."""
    stats = []
    for p in parts:
        flat = p.reshape(-1, p.shape[-1])
        mu = flat.mean(0, dtype=np.float32)
        stats.append((np.float32(len(flat)), mu, ((flat - mu) ** 2).sum(0, dtype=np.float32)))
    total = sum(n for n, _, _ in stats)
    mean = sum(n * mu for n, mu, _ in stats) / total
    m2 = sum(m2 + n * (mu - mean) ** 2 for n, mu, m2 in stats)
    return (m2 / total).astype(np.float32)


@pytest.mark.multi_device
@pytest.mark.parametrize("masked", [False, True])
def test_synchronized_variance_is_exact_at_any_offset(masked):
    """Relative error of the global variance <= 1e-6 at every mean up to 1e4 (float32 in).

    Reference: float64 NumPy moments of the same float32 data (the data's own rounding is
    not an error of the moments). The previous implementation (Chan on float32 means)
    erred by ~1e-4 at mean 1e4 and fails this test; so does ``E[x²] − E[x]²``.
    """
    strategy = _strategy()
    x, mask = _offset_batch(11)
    sizes = (24, 40)  # unequal shards
    parts, mparts = np.split(x, [sizes[0]]), np.split(mask, [sizes[0]])
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )
    ms = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(mparts[ctx.replica_id_in_sync_group])
    )

    @tf.function
    def step(x, m):
        return synchronized_moments(x, [0, 1, 2], m if masked else None)

    count, mean, var = strategy.run(step, args=(xs, ms))
    x64 = x.astype(np.float64).reshape(-1, len(OFFSETS))
    w = np.broadcast_to(mask, x.shape).reshape(-1, len(OFFSETS)) if masked else np.ones_like(x64)
    n_ref = w.sum(0)
    mean_ref = (x64 * w).sum(0) / n_ref
    var_ref = (((x64 - mean_ref) ** 2) * w).sum(0) / n_ref
    for replica in range(2):
        got_n, got_mean, got_var = (
            strategy.experimental_local_results(t)[replica].numpy().reshape(-1)
            for t in (count, mean, var)
        )
        np.testing.assert_allclose(np.broadcast_to(got_n, n_ref.shape), n_ref, rtol=0)
        np.testing.assert_allclose(got_mean, mean_ref, rtol=1e-7, atol=1e-6)
        rel = np.abs(got_var - var_ref) / var_ref
        assert rel.max() <= 1e-6, dict(zip(OFFSETS, rel.tolist(), strict=True))
    if not masked:
        # the case discriminates: the previous formula misses 1e-6 by two orders here
        old = _old_chan_float32(parts)
        assert (np.abs(old - var_ref) / var_ref)[OFFSETS.index(1e4)] > 1e-5


@pytest.mark.multi_device
def test_sync_layer_moving_variance_is_exact_at_any_offset():
    """Through the layer: with momentum 0 the moving variance is the global batch variance."""
    strategy = _strategy()
    x, _ = _offset_batch(12)
    parts = np.split(x, [40])
    with strategy.scope():
        layer = SyncBatchNormalization(momentum=0.0)
        layer.build((None, 4, 4, len(OFFSETS)))
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )
    strategy.run(tf.function(lambda x: layer(x, training=True)), args=(xs,))
    exact = x.astype(np.float64).reshape(-1, len(OFFSETS)).var(0)
    for value in strategy.experimental_local_results(layer.moving_variance.value):
        assert (np.abs(value.numpy() - exact) / exact).max() <= 1e-6


@pytest.mark.parametrize("masked", [False, True])
def test_local_moments_error_does_not_grow_with_the_offset(masked):
    """One device (float32 accumulation): <= 1e-6 relative at every offset up to 1e4.

    The plain two-pass form ``Σ(x − mean)²/n`` (computed below the same way, in TF
    float32) misses by its mean's error squared: > 1e-6 at mean 1e4 on this batch.
    """
    x, mask = _offset_batch(13)
    w = np.broadcast_to(mask, x.shape) if masked else np.ones_like(x)
    x64, w64 = x.astype(np.float64).reshape(-1, 8), w.astype(np.float64).reshape(-1, 8)
    mean_ref = (x64 * w64).sum(0) / w64.sum(0)
    var_ref = (((x64 - mean_ref) ** 2) * w64).sum(0) / w64.sum(0)
    _, mean, var = local_moments(tf.constant(x), [0, 1, 2], tf.constant(mask) if masked else None)
    rel = np.abs(var.numpy().reshape(-1) - var_ref) / var_ref
    assert rel.max() <= 1e-6, dict(zip(OFFSETS, rel.tolist(), strict=True))
    np.testing.assert_allclose(mean.numpy().reshape(-1), mean_ref, rtol=1e-7, atol=1e-6)
    if not masked:
        xt = tf.constant(x)
        plain_mean = tf.reduce_mean(xt, [0, 1, 2], keepdims=True)
        plain = tf.reduce_mean(tf.math.squared_difference(xt, plain_mean), [0, 1, 2]).numpy()
        assert (np.abs(plain - var_ref) / var_ref)[OFFSETS.index(1e4)] > 1e-6


def test_sync_without_strategy_is_plain(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    a, b = SyncBatchNormalization(), BatchNormalization()
    np.testing.assert_allclose(a(x, training=True).numpy(), b(x, training=True).numpy(), **TOL)
    assert SyncBatchNormalization().get_config()["synchronized"] is True


def test_combine_moments_is_exact_for_groups(rng):
    groups = [rng.normal(size=k) * 1e-2 + 1e4 for k in (1, 5, 17)]
    counts = np.array([[len(g)] for g in groups], "float64")
    means = np.array([[g.mean()] for g in groups])
    m2 = np.array([[((g - g.mean()) ** 2).sum()] for g in groups])
    n, mean, total_m2 = (t.numpy() for t in combine_moments(counts, means, m2))
    allx = np.concatenate(groups)
    np.testing.assert_allclose(n, [allx.size])
    np.testing.assert_allclose(mean, [allx.mean()], rtol=1e-15)
    np.testing.assert_allclose(total_m2 / n, [allx.var()], rtol=1e-9)
