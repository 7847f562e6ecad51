"""Graphs with FusedNorm nodes on ONNX Runtime CPU, both routes, against the NumPy reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from bnexport_plugins.fused_norm.ort_cpu import make_cpu_session
from bnexport_plugins.fused_norm.reference import fused_norm
from fused_norm_graphs import fused_norm_model
from onnx import TensorProto

from bnexport.errors import PluginError

RNG = np.random.default_rng(7)

CASES = [
    ([2, 6, 5, 4], {"activation": "silu"}),
    ([2, 5, 4, 6], {"axis": 3, "activation": "leaky_relu", "alpha": 0.2}),
    ([3, 6], {"activation": "relu6"}),
    (
        [8, 6, 3, 2],
        {"mode": "batch_stats", "virtual_batch_size": 2, "return_stats": 1, "activation": "relu"},
    ),
    ([4, 3, 6], {"mode": "batch_stats", "axis": 2, "activation": "sigmoid", "epsilon": 1e-5}),
    ([6, 4, 3, 6], {"mode": "batch_stats", "axis": 3, "virtual_batch_size": 3, "return_stats": 1}),
]
ELEMS = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16),
         "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}  # fmt: skip
# Y tolerances vs the float64 reference: "extensions" runs the reference itself (float32 output
# exact; 16-bit may differ by one ulp from the cast around the op); "lower" is float32 ORT math.
TOL = {
    ("extensions", "float32"): 0.0,
    ("lower", "float32"): 2e-5,
    ("extensions", "float16"): 2**-10 * 8,
    ("lower", "float16"): 2**-10 * 8,
    ("extensions", "bfloat16"): 2**-7 * 8,
    ("lower", "bfloat16"): 2**-7 * 8,
}


def inputs(shape, attrs, dtype):
    c = shape[attrs.get("axis", 1)]
    x = (RNG.standard_normal(shape) * 2 + 3).astype(dtype)
    return x, RNG.standard_normal(c).astype(np.float32), RNG.standard_normal(c).astype(np.float32)


@pytest.mark.parametrize("backend", ["extensions", "lower"])
@pytest.mark.parametrize("dtype", list(ELEMS))
@pytest.mark.parametrize("shape,attrs", CASES)
def test_cpu_session_matches_reference(shape, attrs, dtype, backend):
    elem, np_dtype = ELEMS[dtype]
    wrap = dtype == "bfloat16"  # ORT's Python API feeds no bfloat16 arrays
    model = fused_norm_model(elem, shape, wrap_cast=wrap, **attrs)
    x, scale, shift = inputs(shape, attrs, np_dtype)
    want = fused_norm(x, scale, shift, **attrs)
    want = want if isinstance(want, tuple) else (want,)
    feed_x = x.astype(np.float32) if wrap else x
    got = make_cpu_session(model, backend=backend).run(
        None, {"x": feed_x, "scale": scale, "shift": shift}
    )
    assert len(got) == len(want)
    y = got[0].astype(np.float64)
    assert got[0].dtype == (np.float32 if wrap else np_dtype) and got[0].shape == want[0].shape
    tol = TOL[backend, dtype]
    np.testing.assert_allclose(y, want[0].astype(np.float64), rtol=tol, atol=tol)
    for g, w in zip(
        got[1:], want[1:], strict=True
    ):  # statistics: float32, from float64 (or float32 ORT)
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(
            g, w, rtol=1e-5 if backend == "lower" else 0, atol=1e-5 if backend == "lower" else 0
        )


def test_dynamic_batch_not_divisible_raises():
    model = fused_norm_model(
        TensorProto.FLOAT, ["N", 3, 4], mode="batch_stats", virtual_batch_size=4
    )
    sess = make_cpu_session(model, backend="extensions")
    x, s, b = inputs([6, 3, 4], {}, np.float32)
    with pytest.raises(PluginError, match="does not divide"):
        sess.run(None, {"x": x, "scale": s, "shift": b})
    x8 = inputs([8, 3, 4], {}, np.float32)[0]  # the session stays usable
    np.testing.assert_array_equal(
        sess.run(None, {"x": x8, "scale": s, "shift": b})[0],
        fused_norm(x8, s, b, mode="batch_stats", virtual_batch_size=4),
    )


@pytest.mark.parametrize("backend", ["extensions", "lower"])
def test_static_bad_graph_rejected_at_session_creation(backend):
    model = fused_norm_model(TensorProto.FLOAT, [2, 8, 4])
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 7
    with pytest.raises(PluginError, match="scale must have shape"):
        make_cpu_session(model, backend=backend)


def test_lowering_uses_standard_ops_only():
    from bnexport_plugins.fused_norm.lowering import lower_fused_norm

    model = fused_norm_model(
        TensorProto.FLOAT,
        [4, 3, 2],
        mode="batch_stats",
        virtual_batch_size=2,
        return_stats=1,
        opset=17,
    )
    lowered = lower_fused_norm(model)
    assert {n.domain for n in lowered.graph.node} == {""}
    assert "bnexport" not in {o.domain for o in lowered.opset_import}
    x, s, b = inputs([4, 3, 2], {}, np.float32)
    got = make_cpu_session(lowered).run(None, {"x": x, "scale": s, "shift": b})
    want = fused_norm(x, s, b, mode="batch_stats", virtual_batch_size=2, return_stats=1)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
