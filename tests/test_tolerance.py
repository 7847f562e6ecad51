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


# --- the range term: |d| <= atol + rtol·|ref| + range_rtol·max|ref| (max per output channel) ---


def _deep_net_output(seed: int = 0) -> np.ndarray:
    """A channels-last activation like EfficientNet's top_activation: one channel reaches ~950."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((2, 4, 4, 6)) * 0.5
    ref[..., 0] *= 950.0 / np.abs(ref[..., 0]).max()  # max|ref| of channel 0: 950
    ref[0, :2, :2, 0] = [[0.3, -0.02], [0.0, 1.5]]  # and elements near zero
    return ref.astype(np.float32)


def test_range_defaults_per_precision():
    assert tolerance.default_range_rtol("float32") == 1e-5
    assert tolerance.default_range_rtol("fp16") == 1e-3
    assert tolerance.default_range_rtol("bf16") == 1e-2
    assert tolerance.default_tolerance("float32").range_rtol == 1e-5


def test_channel_range_is_per_last_axis_and_per_output_for_vectors():
    ref = np.array([[1.0, -5.0, 0.0], [-3.0, 2.0, np.nan]])
    np.testing.assert_array_equal(tolerance.channel_range(ref), [[3.0, 5.0, 0.0]])
    np.testing.assert_array_equal(tolerance.channel_range(np.array([1.0, -7.0, 2.0])), [7.0])
    bound = tolerance.bounds(ref[:, :2], 0.0, 0.0, range_rtol=0.1)
    np.testing.assert_allclose(bound, [[0.3, 0.5], [0.3, 0.5]])


def test_deep_net_error_passes_verify_and_parity():
    """max|ref| 950, error 1.4e-3 near zero (1.5e-6 of the range): a correct deep export."""
    ref = _deep_net_output()
    out = ref.copy()
    small = np.abs(ref[..., 0]) < 2.0  # elements near zero, where rtol·|ref| is small
    assert small.any()
    out[..., 0] = np.where(small, ref[..., 0] + 1.4e-3, ref[..., 0])
    rtol, atol = tolerance.default_tolerances("float32")
    rng_rtol = tolerance.default_range_rtol("float32")
    # without the range term (the old rule) this correct export was rejected
    assert not tolerance.allclose(ref, out, rtol, atol)
    assert tolerance.allclose(ref, out, rtol, atol, rng_rtol)
    v = verify.compare({"y": ref}, {"y": out}, rtol=rtol, atol=atol, batch=2, range_rtol=rng_rtol)
    p = compare_arrays("y", ref, out, rtol=rtol, atol=atol, range_rtol=rng_rtol)
    assert v.passed and p.passed and p.range_rtol == rng_rtol
    assert v.per_output["y"]["max_abs_ref"] == pytest.approx(950.0, rel=1e-6)


@pytest.mark.parametrize("channel", [0, 3])
def test_wrong_small_value_still_fails_within_its_channel(channel):
    """An error of 1e-3 of the channel's own range fails, even beside a channel of range 950."""
    ref = _deep_net_output(1)
    out = ref.copy()
    span = float(np.abs(ref[..., channel]).max())
    idx = np.unravel_index(np.argmin(np.abs(ref[..., channel])), ref.shape[:-1])
    out[(*idx, channel)] += 1e-3 * span
    rtol, atol = tolerance.default_tolerances("float32")
    rng_rtol = tolerance.default_range_rtol("float32")
    assert tolerance.violations(ref, out, rtol, atol, rng_rtol).sum() == 1
    v = verify.compare({"y": ref}, {"y": out}, rtol=rtol, atol=atol, batch=2, range_rtol=rng_rtol)
    p = compare_arrays("y", ref, out, rtol=rtol, atol=atol, range_rtol=rng_rtol)
    assert not v.passed and not p.passed


def test_verify_applies_the_default_range_term_and_names_the_override(monkeypatch):
    """export's verification uses range_rtol by default; its error names --range-rtol."""
    from types import SimpleNamespace

    from bnexport.errors import VerificationError

    ref = _deep_net_output(2)
    out = ref.copy()
    out[..., 0] += np.float32(1.4e-3)  # 1.5e-6 of the 950 channel's range on each element
    monkeypatch.setattr(verify, "make_inputs", lambda *a, **k: {})
    monkeypatch.setattr(verify, "run_reference", lambda loaded, feeds: {"y": ref})
    monkeypatch.setattr(verify, "run_onnx", lambda m, f, s=None: ({"y": out}, "fake"))
    loaded = SimpleNamespace(inputs=[])
    assert verify.verify(loaded, None, dtype="float32", batch=2).passed
    with pytest.raises(VerificationError, match=r"range_rtol 0,.*--range-rtol"):
        verify.verify(loaded, None, dtype="float32", batch=2, range_rtol=0.0)


def test_range_rtol_options_on_the_cli():
    from bnexport.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "m.keras", "-o", "m.onnx", "--range-rtol", "0"])
    assert args.range_rtol == 0.0
    args = parser.parse_args(["parity", "m.keras", "m.onnx", "--range-rtol", "1e-4"])
    assert args.range_rtol == 1e-4
