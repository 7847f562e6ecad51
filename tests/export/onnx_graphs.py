"""Helpers for the fold tests: build small ONNX graphs, run them, compare them.

Tolerances (folded graph vs the original graph, both run by onnxruntime with graph
optimizations disabled, or by NumPy for FusedNorm):

- float32: ``|a − b| <= 1e-5·|b| + 1e-5·max|b|`` (folding reassociates one product);
- float16: ``|a − b| <= 1e-2·|b| + 1e-2·max|b|`` (a float16 rounding of folded weights).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx.reference
from onnx.reference.op_run import OpRun
from support import op_counts, run_ort  # noqa: F401 - re-exported for the fold tests

TOL = {np.float32: 1e-5, np.float16: 1e-2}


def build(text: str, inits: dict[str, np.ndarray], dtype=np.float32) -> onnx.ModelProto:
    """Parse ``text`` (``T`` is replaced by the ONNX type name) and add initializers.

    Float initializers are cast to ``dtype``; integer ones are kept.
    """
    name = {np.float32: "float", np.float16: "float16"}[dtype]
    model = onnx.parser.parse_model(text.replace("T[", f"{name}["))
    for key, value in inits.items():
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(dtype)
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, key))
    onnx.checker.check_model(model, full_check=True)
    return model


def bn_params(rng: np.random.Generator, c: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Random BN gamma/beta/mean/var named ``{prefix}g,b,m,v`` (statistics far from 0/1)."""
    return {
        f"{prefix}g": rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c),
        f"{prefix}b": rng.normal(0, 1, c),
        f"{prefix}m": rng.normal(0, 2, c),
        f"{prefix}v": rng.uniform(0.2, 3.0, c),
    }


class FusedNorm(OpRun):
    """``bnexport::FusedNorm`` for ONNX's NumPy evaluator (the plugin's NumPy reference)."""

    op_domain = "bnexport"

    def _run(  # noqa: D102
        self, x, scale, shift, axis=None, mode=None, activation=None, alpha=None,
        epsilon=None, virtual_batch_size=None, return_stats=None, plugin_namespace=None,
    ):  # fmt: skip
        from bnexport_plugins.fused_norm.reference import fused_norm

        out = fused_norm(
            x, scale, shift, axis=axis, mode=mode, activation=activation, alpha=alpha,
            epsilon=epsilon, virtual_batch_size=virtual_batch_size, return_stats=return_stats,
        )  # fmt: skip
        return out if isinstance(out, tuple) else (out,)


def run_numpy(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate ``model`` with ONNX's NumPy evaluator; FusedNorm via the plugin reference."""
    evaluator = onnx.reference.ReferenceEvaluator(model, new_ops=[FusedNorm])
    return evaluator.run(None, feeds)


def check_valid(model: onnx.ModelProto) -> None:
    """Full ONNX checker (with shape inference); registers the FusedNorm schema first."""
    from bnexport_plugins.fused_norm.onnx_node import register_onnx_schema

    register_onnx_schema()
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype=np.float32) -> None:
    """Compare with the per-dtype tolerance of this module; dtype and shape must match."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[dtype]
    a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
    assert np.isfinite(a64).all()
    np.testing.assert_allclose(a64, e64, rtol=tol, atol=tol * float(np.abs(e64).max()))


def assert_same_outputs(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    dtype=np.float32,
    *,
    numpy_eval: bool = False,
) -> None:
    """Folded graph is valid and computes the original's outputs (same names and order)."""
    check_valid(folded)
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    expected = run_ort(original, feeds)
    actual = run_numpy(folded, feeds) if numpy_eval else run_ort(folded, feeds)
    for a, e in zip(actual, expected, strict=True):
        assert_close(np.asarray(a), e, dtype)
