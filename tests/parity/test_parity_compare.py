"""The comparator against hand-computed NumPy statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnexport.parity.compare import (
    DEFAULT_TOLERANCES,
    compare_arrays,
    default_tolerances,
    resolve_tolerance,
)


def test_identical_arrays_pass():
    a = np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)
    c = compare_arrays("y", a, a.copy(), rtol=0.0, atol=0.0)
    assert c and c.passed and c.violations == 0
    assert c.max_absdiff == 0.0 and c.max_reldiff == 0.0 and c.cosine == pytest.approx(1.0)
    assert c.top1 == 1.0 and c.top5 == 1.0


def test_statistics_match_numpy():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((50, 3))
    out = ref + rng.normal(0, 1e-3, ref.shape)
    c = compare_arrays("y", ref, out, rtol=0.0, atol=1.0)
    diff = np.abs(out - ref)
    assert c.max_absdiff == pytest.approx(diff.max(), rel=1e-12)
    assert c.mean_absdiff == pytest.approx(diff.mean(), rel=1e-12)
    assert c.max_reldiff == pytest.approx((diff / np.abs(ref)).max(), rel=1e-12)
    cos = (ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out)
    assert c.cosine == pytest.approx(cos, rel=1e-12)
    assert c.percentiles["p99.9"] == pytest.approx(np.percentile(diff, 99.9), rel=1e-12)
    assert c.percentiles["p50"] <= c.percentiles["p90"] <= c.percentiles["p99"]


def test_tolerance_boundary_elementwise():
    ref = np.array([1.0, 100.0, 0.0])
    # bound = atol + rtol*|ref| = [0.011, 0.11, 0.01]
    ok = compare_arrays("y", ref, ref + [0.0109, 0.109, 0.0099], rtol=1e-3, atol=1e-2)
    assert ok.passed
    bad = compare_arrays("y", ref, ref + [0.0, 0.0, 0.0101], rtol=1e-3, atol=1e-2)
    assert not bad and bad.violations == 1 and "1 of 3 elements" in bad.reason
    # max_reldiff ignores the reference zero
    assert bad.max_reldiff == 0.0 and bad.max_absdiff == pytest.approx(0.0101)


@pytest.mark.parametrize(
    ("check", "passes"), [("elementwise", False), ("max", True), ("mean", True), ("quantile", True)]
)
def test_check_modes(check, passes):
    ref = np.linspace(0.1, 1.0, 1000)
    out = ref.copy()
    out[0] += 0.3  # elementwise bound there: 0.5*0.1; max bound: 0.5*max|ref| = 0.5
    c = compare_arrays("y", ref, out, rtol=0.5, atol=0.0, check=check)
    assert c.passed is passes


def test_nonfinite_reported_never_averaged():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    out = np.array([1.0, np.nan, 3.0, np.inf])
    c = compare_arrays("y", ref, out, rtol=1.0, atol=1.0)
    assert not c
    assert c.nonfinite_out == {"nan": 1, "inf": 1} and c.nonfinite_ref == {"nan": 0, "inf": 0}
    assert "candidate 1 NaN / 1 Inf" in c.reason
    assert c.max_absdiff == 0.0 and np.isfinite(c.mean_absdiff)  # over finite elements only
    c2 = compare_arrays("y", out, out, rtol=1.0, atol=1.0)
    assert not c2 and c2.nonfinite_ref == {"nan": 1, "inf": 1}
    json.dumps(c.to_dict(), allow_nan=False)


def test_shape_mismatch_fails():
    c = compare_arrays("y", np.zeros((2, 3)), np.zeros((3, 2)), rtol=1, atol=1)
    assert not c and "shape mismatch" in c.reason
    assert json.loads(json.dumps(c.to_dict(), allow_nan=False))["max_absdiff"] == "inf"


def test_topk_agreement():
    ref = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = ref.copy()
    out[1] = [0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0]  # row 1: argmax moves, top-5 loses class 0
    c = compare_arrays("probs", ref, out, rtol=0, atol=10)
    assert c.top1 == pytest.approx(0.5)
    assert c.top5 == pytest.approx((1.0 + 4 / 5) / 2)
    small = compare_arrays("p", ref[:, :3], ref[:, :3], rtol=0, atol=0)
    assert small.top1 == 1.0 and small.top5 is None  # K <= 5: no top-5
    assert compare_arrays("v", ref[0], ref[0], rtol=0, atol=0).top1 is None  # not [N, K]


def test_default_and_resolved_tolerances():
    # the one policy (bnexport.tolerance): the same numbers the exporter's verify uses
    assert default_tolerances("fp32") == DEFAULT_TOLERANCES["float32"] == (1e-4, 1e-4)
    assert default_tolerances(np.dtype(np.float16)) == (2e-2, 2e-2)
    assert default_tolerances("fp16") == (2e-2, 2e-2)
    assert resolve_tolerance(None, "y", 0.5) == 0.5
    assert resolve_tolerance(0.1, "y", 0.5) == 0.1
    per = {"y": 0.2, "": 0.3}
    assert resolve_tolerance(per, "y", 0.5) == 0.2 and resolve_tolerance(per, "z", 0.5) == 0.3


def test_agreement_check_uses_top1_unless_the_reference_is_degenerate():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(100, 10))
    out = ref.copy()
    out[:3] = out[:3, ::-1]  # flip 3 rows: their argmax changes (almost surely)
    changed = float(np.mean(ref.argmax(1) != out.argmax(1)))
    c = compare_arrays("logits", ref, out, rtol=0, atol=0, check="agreement")
    assert c.top1 == pytest.approx(1 - changed) and c.passed == (1 - changed >= 0.99)
    assert not compare_arrays("l", ref, out, rtol=0, atol=0, check="agreement", min_top1=1.0)
    assert compare_arrays("l", ref, out, rtol=0, atol=0, check="agreement", min_top1=0.9)
    # every reference row predicts class 0: top-1 says nothing, cosine decides
    flat = np.zeros((50, 10))
    flat[:, 0] = 10.0
    noisy = flat + rng.normal(size=flat.shape) * 3.0  # argmax mostly kept, values far off
    c = compare_arrays("l", flat, noisy, rtol=0, atol=0, check="agreement")
    cos = float(np.sum(flat * noisy) / np.linalg.norm(flat) / np.linalg.norm(noisy))
    assert c.cosine == pytest.approx(cos) and c.passed == (cos >= 0.99)
    assert not c.passed and "one class for every row" in c.reason
    # not class scores: cosine
    feat = rng.normal(size=(4, 8, 8, 3))
    assert compare_arrays("f", feat, feat * 1.001, rtol=0, atol=0, check="agreement").passed
    assert not compare_arrays("f", feat, -feat, rtol=0, atol=0, check="agreement").passed


def test_nmse_matches_numpy():
    rng = np.random.default_rng(3)
    ref, out = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    want = float(np.sum((out - ref) ** 2) / np.sum(ref**2))
    assert compare_arrays("y", ref, out, rtol=0, atol=0).nmse == pytest.approx(want, rel=1e-12)
