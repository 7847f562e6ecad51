"""Same numbers as legacy tf.keras (tf_keras) for renorm and ghost batches.

Legacy ghost batches group example ``i`` with ``i mod G`` (``G = N / v``); ours are the
contiguous groups of ``v`` examples, so tf_keras is fed the batch permuted to make its
groups ours, and its output is permuted back.

float32 on both sides; tolerance 1e-4 absolute on unit-scale outputs, 1e-5 on statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras  # the [test] extra installs it (also the [legacy] extra)

from bnexport.layers.batch_normalization import BatchNormalization

CASES = [
    ((16, 5), {"renorm": True, "renorm_clipping": {"rmax": 1.3, "rmin": 0.8, "dmax": 0.5}}),
    ((8, 4, 4, 3), {"renorm": True}),
    ((16, 5), {"virtual_batch_size": 4}),
    ((8, 4, 4, 3), {"virtual_batch_size": 2}),
    ((8, 3, 4, 4), {"virtual_batch_size": 4, "axis": 1}),
    ((8, 4, 4, 3), {"virtual_batch_size": 4, "renorm": True}),
]


@pytest.mark.parametrize("shape,kwargs", CASES, ids=[str(k) for _, k in CASES])
def test_matches_tf_keras(shape, kwargs, rng):
    common = {"momentum": 0.7, "renorm_momentum": 0.6, **kwargs}
    ours = BatchNormalization(**common)
    legacy = tf_keras.layers.BatchNormalization(**common)
    ours.build(shape)
    legacy.build(shape)
    gamma = rng.uniform(0.5, 1.5, ours.gamma.shape).astype("float32")
    beta = rng.normal(size=ours.beta.shape).astype("float32")
    for layer in (ours, legacy):
        layer.gamma.assign(np.reshape(gamma, layer.gamma.shape))
        layer.beta.assign(np.reshape(beta, layer.beta.shape))
    vbs = kwargs.get("virtual_batch_size") or shape[0]
    groups = shape[0] // vbs

    def to_legacy(a):  # legacy group g = rows g, g+G, ... <- our rows g·v ... g·v+v-1
        return a.reshape(groups, vbs, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

    def from_legacy(a):
        return a.reshape(vbs, groups, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

    for step in range(3):
        x = (rng.normal(size=shape) * (step + 1) + step).astype("float32")
        y_ours = ours(x, training=True).numpy()
        y_legacy = from_legacy(legacy(to_legacy(x), training=True).numpy())
        np.testing.assert_allclose(y_ours, y_legacy, atol=1e-4, rtol=1e-4, err_msg=f"step {step}")
        for name in ("moving_mean", "moving_variance") + (
            ("renorm_mean", "renorm_stddev", "moving_stddev") if ours.renorm else ()
        ):
            np.testing.assert_allclose(
                getattr(ours, name).numpy().ravel(),
                getattr(legacy, name).numpy().ravel(),
                atol=1e-5,
                rtol=1e-5,
                err_msg=name,
            )
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(ours(x).numpy(), legacy(x).numpy(), atol=1e-4, rtol=1e-4)
