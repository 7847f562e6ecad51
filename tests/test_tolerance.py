"""The one tolerance policy (bnexport.tolerance), and that verify and parity both apply it.

References: NumPy's ``allclose`` (the stated criterion) and hand-made arrays where a
max-norm test and the elementwise test disagree.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnexport import tolerance
from bnexport.export import verify
from bnexport.parity.compare import compare_arrays


@pytest.mark.parametrize("seed", range(5))
def test_criterion_is_numpy_allclose(seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=200) * 10.0 ** rng.integers(-3, 3, size=200)
    out = ref + rng.normal(size=200) * 1e-4
    for rtol, atol in ((1e-4, 1e-4), (1e-3, 0.0), (0.0, 1e-4)):
        want = ~np.isclose(out, ref, rtol=rtol, atol=atol)
        np.testing.assert_array_equal(tolerance.violations(ref, out, rtol, atol), want)
        assert tolerance.allclose(ref, out, rtol, atol) == np.allclose(out, ref, rtol, atol)


def test_nonfinite_always_fails():
    ref = np.array([1.0, 2.0, 3.0])
    for bad in (np.nan, np.inf, -np.inf):
        out = ref.copy()
        out[1] = bad
        assert tolerance.violations(ref, out, 1.0, 1.0).tolist() == [False, True, False]
    assert not tolerance.allclose(np.array([np.nan]), np.array([np.nan]), 1.0, 1.0)
    assert not tolerance.allclose(ref, ref[:2], 1.0, 1.0)  # shape mismatch


def test_defaults_and_names():
    assert tolerance.default_tolerances("fp32") == (1e-4, 1e-4)
    assert tolerance.default_tolerances(np.dtype("float32")) == (1e-4, 1e-4)
    assert tolerance.default_tolerances("float16") == tolerance.default_tolerances("fp16")
    assert tolerance.default_tolerances("bf16") == (1e-1, 1e-1)
    assert tolerance.precision_name("float64") == "float32"  # the strictest row
    row = tolerance.default_tolerance("int8")
    assert row.min_top1 == tolerance.INT8_MIN_TOP1 == 0.99 and row.min_cosine == 0.99


# a missed-epsilon-like error on a small element: max-norm passes, elementwise does not
SMALL_WRONG = (np.array([[100.0, 0.01]], np.float32), np.array([[100.0, 0.0105]], np.float32))
# a ulp-level error on the big element: both pass
BIG_CLOSE = (np.array([[100.0, 0.01]], np.float32), np.array([[100.005, 0.01]], np.float32))


@pytest.mark.parametrize("case,passes", [(SMALL_WRONG, False), (BIG_CLOSE, True)])
def test_verify_and_parity_agree(case, passes):
    ref, out = case
    rtol, atol = verify.TOLERANCES["float32"]
    assert (rtol, atol) == tolerance.default_tolerances("float32")
    v = verify.compare({"y": ref}, {"y": out}, rtol=rtol, atol=atol, batch=1)
    p = compare_arrays("y", ref, out, rtol=rtol, atol=atol)
    assert v.passed is passes and p.passed is passes
    # the old max-norm verify test would have passed the wrong small element
    old_bound = 1e-4 * np.abs(ref).max() + 1e-5
    assert np.abs(out - ref).max() <= old_bound


def test_is_quantized_sees_qdq_nodes_in_subgraphs():
    plain = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }"""
    )
    qdq = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
            s = Constant <value = float {0.1}> ()
            z = Constant <value = int8 {0}> ()
            q = QuantizeLinear(x, s, z)
            y = DequantizeLinear(q, s, z)
        }"""
    )
    nested = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) {
            y = If(c) <then_branch = t () => (float[2] a) {
                s = Constant <value = float {0.1}> ()
                z = Constant <value = int8 {0}> ()
                q = QuantizeLinear(x, s, z)
                a = DequantizeLinear(q, s, z)
            }, else_branch = e () => (float[2] b) { b = Identity(x) }>
        }"""
    )
    assert not tolerance.is_quantized(plain)
    assert tolerance.is_quantized(qdq) and tolerance.is_quantized(nested)
