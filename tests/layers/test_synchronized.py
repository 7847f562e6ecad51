"""Synchronized statistics under MirroredStrategy on two logical CPU devices.

The result of two replicas must equal one layer seeing the global batch: outputs,
input gradients, summed γ/β gradients and moving statistics, to float32 tolerance
(1e-5 absolute / 1e-4 relative on unit-scale values).
"""

from __future__ import annotations

import numpy as np
import pytest
from bn_reference import make_reference, randomize

tf = pytest.importorskip("tensorflow")

from bnexport.layers.batch_normalization import (  # noqa: E402
    BatchNormalization,
    SyncBatchNormalization,
)
from bnexport.layers.moments import combine_moments  # noqa: E402

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
