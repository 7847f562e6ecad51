"""The one tolerance policy: when does a computed tensor match its reference?

Used by the exporter's verification (:mod:`bnexport.export.verify`), the parity checker
(:mod:`bnexport.parity`) and everything that reports them, so a model that passes one
passes the other.

**Criterion** (NumPy's ``allclose``, Polygraphy's default)::

    |out − ref| <= atol + rtol · |ref|        for every element

NaN or ±Inf on either side fails. An elementwise test is the stricter of the usual
choices: a max-norm test (``max|out − ref| <= rtol · max|ref| + atol``) lets a wrong
*small* value hide under the tensor's largest one, e.g. a missed BN epsilon on a
low-variance channel. Parity can also apply the inequality to one statistic of the
error (``check="max"``, ``"mean"``, ``"quantile"``) when asked; the default is this one.

**Defaults**, by the precision the candidate computed in:

=============  ======  ======  ======================================================
precision      rtol    atol    why
=============  ======  ======  ======================================================
float32        1e-4    1e-4    folding reassociates ``(x·W)·γ/σ`` into ``x·(W·γ/σ)``
                               and backends sum in other orders: a few ulps per
                               layer, ~1e-5 absolute after 50 layers on unit-scale
                               activations. A missed ε (1e-3 on a unit variance moves
                               outputs by 5e-4 relative) or a wrong weight fails.
float16        2e-2    2e-2    11-bit significand (ε ≈ 9.8e-4) rounded at every layer:
                               ~1 % of the output's range after 50 layers.
bfloat16       1e-1    1e-1    8-bit significand (ε ≈ 7.8e-3).
int8           —       —       elementwise closeness is not the question for a
                               quantized graph (errors of ~1 % of the range are the
                               design); see below.
=============  ======  ======  ======================================================

**INT8 (QDQ) graphs** — a graph with ``QuantizeLinear``/``DequantizeLinear`` nodes (see
:func:`is_quantized`) is judged by what quantization is meant to preserve: **top-1
agreement** with the float model on every class-score output (rank 2, ``K >= 2``
classes) must be at least :data:`INT8_MIN_TOP1` (99 %), and every other output must keep
a cosine similarity of at least :data:`INT8_MIN_COSINE` (0.99). The elementwise
statistics are still reported (with ``rtol = atol = 1e-1`` for reading), not used for
pass/fail.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: top-1 agreement a class-score output of an INT8 graph must reach (fraction of rows)
INT8_MIN_TOP1 = 0.99
#: cosine similarity any other output of an INT8 graph must reach
INT8_MIN_COSINE = 0.99
#: ONNX ops that mark a quantized graph
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The defaults for one precision.

    Attributes:
        rtol: relative tolerance of the elementwise criterion.
        atol: absolute tolerance of the elementwise criterion.
        min_top1: when set, pass/fail is top-1 agreement >= this on class-score
            outputs (and cosine >= ``min_cosine`` on the others), not ``rtol``/``atol``.
        min_cosine: see ``min_top1``.
    """

    rtol: float
    atol: float
    min_top1: float | None = None
    min_cosine: float | None = None


DEFAULTS: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 1e-4),
    "float16": Tolerance(2e-2, 2e-2),
    "bfloat16": Tolerance(1e-1, 1e-1),
    "int8": Tolerance(1e-1, 1e-1, min_top1=INT8_MIN_TOP1, min_cosine=INT8_MIN_COSINE),
}

_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "qdq": "int8",
    "uint8": "int8",
}


def precision_name(precision: Any) -> str:
    """Canonical name (``float32``, ``float16``, ``bfloat16``, ``int8``) of a precision.

    Accepts the names above, their short forms (``fp32``, ``fp16``, ``bf16``) and NumPy
    dtypes. Anything else (float64 included) counts as ``float32``: the strictest row.
    """
    name = str(getattr(precision, "name", precision)).lower()
    name = _ALIASES.get(name, name)
    return name if name in DEFAULTS else "float32"


def default_tolerance(precision: Any) -> Tolerance:
    """The :class:`Tolerance` row for ``precision`` (see :func:`precision_name`)."""
    return DEFAULTS[precision_name(precision)]


def default_tolerances(precision: Any) -> tuple[float, float]:
    """``(rtol, atol)`` for ``precision``."""
    row = default_tolerance(precision)
    return row.rtol, row.atol


def bounds(ref: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """Allowed ``|out − ref|`` per element: ``atol + rtol·|ref|`` (float64)."""
    return atol + rtol * np.abs(np.asarray(ref, np.float64))


def exceeds(absdiff: np.ndarray, absref: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """The criterion on precomputed ``|out − ref|`` and ``|ref|``: mask of failing elements.

    A NaN difference compares False with its bound, so it counts as a violation.
    """
    with np.errstate(invalid="ignore"):
        return ~(absdiff <= atol + rtol * absref)


def violations(ref: Any, out: Any, rtol: float, atol: float) -> np.ndarray:
    """Boolean mask of the elements that fail the criterion (non-finite ones included).

    ``ref`` and ``out`` must have the same shape; compared in float64.
    """
    r = np.asarray(ref, np.float64)
    o = np.asarray(out, np.float64)
    with np.errstate(invalid="ignore"):
        bad = exceeds(np.abs(o - r), np.abs(r), rtol, atol)
    return bad | ~np.isfinite(r) | ~np.isfinite(o)


def allclose(ref: Any, out: Any, rtol: float, atol: float) -> bool:
    """Whether every element passes (same shape required; see the module docstring)."""
    r, o = np.asarray(ref), np.asarray(out)
    return r.shape == o.shape and not bool(violations(r, o, rtol, atol).any())


def is_quantized(model: Any) -> bool:
    """Whether an ``onnx.ModelProto`` holds quantization nodes (a QDQ/INT8 graph).

    Looks at the main graph and every subgraph (``If``/``Loop`` bodies).
    """
    from onnx import AttributeProto

    def graphs(graph: Any) -> Any:
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    yield from graphs(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from graphs(g)

    return any(n.op_type in QUANTIZE_OPS for g in graphs(model.graph) for n in g.node)
