"""The NumPy reference against formulas written out independently, and its input checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from bnexport_plugins.fused_norm import spec
from bnexport_plugins.fused_norm.reference import REFERENCE_OPS, fused_norm

from bnexport.errors import PluginError

RNG = np.random.default_rng(1234)


def act_loop(v: float, name: str, alpha: float) -> float:
    """Scalar activations, spelled out."""
    import math

    if name == "relu":
        return max(v, 0.0)
    if name == "relu6":
        return min(max(v, 0.0), 6.0)
    if name == "leaky_relu":
        return v if v >= 0 else alpha * v
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-v))
    if name == "silu":
        return v / (1.0 + math.exp(-v))
    return v


def expected_batch_stats(x, scale, shift, axis, vbs, eps, act, alpha):
    """Per (ghost batch, channel) moments with np.var, channel by channel."""
    x64 = x.astype(np.float64)
    n = x.shape[0]
    groups = n // vbs if vbs else 1
    size = n // groups
    c_count = x.shape[axis]
    y = np.empty_like(x64)
    means = np.zeros((groups, c_count))
    variances = np.zeros((groups, c_count))
    for g in range(groups):
        for c in range(c_count):
            idx = [slice(None)] * x.ndim
            idx[0] = slice(g * size, (g + 1) * size)
            idx[axis] = c
            block = x64[tuple(idx)]
            mu, var = block.mean(), block.var()
            means[g, c], variances[g, c] = mu, var
            z = (block - mu) / np.sqrt(var + np.float64(np.float32(eps))) * scale[c] + shift[c]
            y[tuple(idx)] = np.vectorize(lambda v: act_loop(v, act, alpha))(z)
    return y, means, variances


@pytest.mark.parametrize("act", spec.ACTIVATIONS)
@pytest.mark.parametrize(
    "shape,axis", [((3, 4, 5, 6), 1), ((3, 5, 6, 4), 3), ((7, 4), 1), ((2, 3, 4), 2)]
)
def test_affine_matches_loops(shape, axis, act):
    x = RNG.standard_normal(shape).astype(np.float32) * 4
    c = shape[axis]
    scale, shift = (
        RNG.standard_normal(c).astype(np.float32),
        RNG.standard_normal(c).astype(np.float32),
    )
    y = fused_norm(x, scale, shift, axis=axis, activation=act, alpha=0.1)
    bshape = [1] * len(shape)
    bshape[axis] = c
    z = x.astype(np.float64) * scale.reshape(bshape) + shift.reshape(bshape)
    want = np.vectorize(lambda v: act_loop(v, act, np.float64(np.float32(0.1))))(z)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)  # float32 rounding of the output


@pytest.mark.parametrize("vbs", [0, 2, 3])
@pytest.mark.parametrize("shape,axis", [((6, 3, 4, 5), 1), ((6, 4, 5, 3), 3), ((6, 3), 1)])
def test_batch_stats_matches_loops(shape, axis, vbs):
    x = (RNG.standard_normal(shape) * 3 + 7).astype(np.float32)
    c = shape[axis]
    scale, shift = (
        RNG.standard_normal(c).astype(np.float32),
        RNG.standard_normal(c).astype(np.float32),
    )
    y, mean, var = fused_norm(
        x,
        scale,
        shift,
        axis=axis,
        mode="batch_stats",
        virtual_batch_size=vbs,
        return_stats=1,
        activation="silu",
        epsilon=1e-3,
    )
    want_y, want_m, want_v = expected_batch_stats(x, scale, shift, axis, vbs, 1e-3, "silu", 0.0)
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    shape_stats = (c,) if vbs == 0 else (shape[0] // vbs, c)
    assert mean.shape == var.shape == shape_stats and mean.dtype == np.float32
    np.testing.assert_allclose(mean, want_m.reshape(shape_stats), rtol=1e-6)
    np.testing.assert_allclose(var, want_v.reshape(shape_stats), rtol=1e-6)


def test_batch_stats_large_mean_keeps_precision():
    # E[x^2] - E[x]^2 in float32 would lose every digit of a 1e-2 spread around 1e4
    x = (1e4 + 1e-2 * RNG.standard_normal((64, 8, 16))).astype(np.float32)
    _, _, var = fused_norm(
        x, np.ones(8, np.float32), np.zeros(8, np.float32), mode="batch_stats", return_stats=1
    )
    want = x.astype(np.float64).transpose(1, 0, 2).reshape(8, -1).var(axis=1)
    np.testing.assert_allclose(var, want, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(np.float16, 1e-3), (ml_dtypes.bfloat16, 8e-3)])
def test_sixteen_bit_rounds_once(dtype, tol):
    x = RNG.standard_normal((4, 6, 5)).astype(dtype)
    s, b = RNG.standard_normal(6).astype(np.float32), RNG.standard_normal(6).astype(np.float32)
    y = fused_norm(x, s, b, mode="batch_stats", activation="relu")
    assert y.dtype == np.dtype(dtype)
    y32 = fused_norm(x.astype(np.float32), s, b, mode="batch_stats", activation="relu")
    np.testing.assert_array_equal(y, y32.astype(dtype))  # same math, one rounding to dtype
    np.testing.assert_allclose(y.astype(np.float32), y32, rtol=tol, atol=tol)


def test_negative_axis_and_registry():
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    s, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    np.testing.assert_array_equal(fused_norm(x, s, b, axis=-1), fused_norm(x, s, b, axis=2))
    assert REFERENCE_OPS[spec.OP_TYPE] is fused_norm


@pytest.mark.parametrize(
    "x_shape,x_dtype,c,attrs,field",
    [
        ((2, 3), np.int32, 3, {}, "dtype"),
        ((2, 3), np.float64, 3, {}, "dtype"),
        ((2, 3), np.float32, 3, {"axis": 2}, "axis"),
        ((6,), np.float32, 6, {"axis": 0}, "rank"),
        ((2, 3, 4), np.float32, 4, {}, "scale"),
        (
            (5, 3, 4),
            np.float32,
            3,
            {"mode": "batch_stats", "virtual_batch_size": 2},
            "virtual_batch_size",
        ),
        (
            (4, 3),
            np.float32,
            4,
            {"mode": "batch_stats", "axis": 0, "virtual_batch_size": 2},
            "axis",
        ),
        ((4, 3), np.float32, 3, {"activation": "gelu"}, "activation"),
        ((4, 3), np.float32, 3, {"return_stats": 1}, "return_stats"),
        ((4, 3), np.float32, 3, {"epsilon": -1.0}, "epsilon"),
        ((0, 3), np.float32, 3, {"mode": "batch_stats"}, "non-empty"),
    ],
)
def test_bad_input_names_the_field(x_shape, x_dtype, c, attrs, field):
    x = np.zeros(x_shape, x_dtype)
    with pytest.raises(PluginError, match=field):
        fused_norm(x, np.ones(c, np.float32), np.zeros(c, np.float32), **attrs)


def test_shift_length_checked():
    with pytest.raises(PluginError, match="shift must have shape"):
        fused_norm(np.zeros((2, 3), np.float32), np.ones(3, np.float32), np.zeros(4, np.float32))


def test_node_attributes_contract():
    attrs = spec.node_attributes(mode="batch_stats", return_stats=1, virtual_batch_size=4)
    assert list(attrs) == sorted(attrs)
    assert set(attrs) == set(spec.ATTRIBUTE_DEFAULTS) | {"plugin_namespace"}
    assert attrs["plugin_namespace"] == spec.PLUGIN_NAMESPACE_STATS
    assert spec.node_attributes()["plugin_namespace"] == spec.PLUGIN_NAMESPACE
    with pytest.raises(PluginError, match="unknown attribute"):
        spec.node_attributes(momentum=0.9)
    with pytest.raises(PluginError, match="axis"):
        spec.node_attributes(axis=-1)
