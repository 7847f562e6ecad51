"""The one tolerance policy: when does a computed tensor match its reference?

Used by the exporter's verification (:mod:`bnexport.export.verify`), the parity checker
(:mod:`bnexport.parity`) and everything that reports them, so a model that passes one
passes the other.

**Criterion** (NumPy's ``allclose`` plus a range term)::

    |out − ref| <= atol + rtol · |ref| + range_rtol · max|ref|      for every element

``max|ref|`` is taken **per output channel** (the last axis of an output of rank >= 2:
Keras's ``channels_last`` layout, the features of a ``Dense`` output; over every other
axis, batch included) and over the whole output for rank 0/1 (:func:`channel_range`).
NaN or ±Inf on either side fails.

Why the range term: a deep network's large activations carry float32 rounding errors
that scale with the *largest* values the sums went through, not with each element. A
model-library EfficientNet (``top_activation``, max|ref| 950) exported correctly shows
a max abs error of 1.4e-3 (1.5e-6 of its range) on elements near zero, which
``atol + rtol·|ref|`` alone rejects. Per channel, not per tensor, so one large channel
does not loosen the others: a missed BN epsilon on a low-variance channel (an error of
~1e-3 of *that channel's* range) still fails. An elementwise test stays the stricter of
the usual choices: a max-norm test (``max|out − ref| <= rtol · max|ref| + atol``) lets a
wrong *small* value hide under the tensor's largest one. Parity can also apply the
inequality to one statistic of the error (``check="max"``, ``"mean"``, ``"quantile"``)
when asked; the default is this one.

**Defaults**, by the precision the candidate computed in:

=============  ======  ======  ==========  ===========================================
precision      rtol    atol    range_rtol  why
=============  ======  ======  ==========  ===========================================
float32        1e-4    1e-4    1e-5        folding reassociates ``(x·W)·γ/σ`` into
                                           ``x·(W·γ/σ)`` and backends sum in other
                                           orders: a few ulps per layer, ~1e-5
                                           absolute after 50 layers on unit-scale
                                           activations. A missed ε (1e-3 on a unit
                                           variance moves outputs by 5e-4 relative)
                                           or a wrong weight fails. range_rtol 1e-5
                                           is ~80 ulps (ε = 1.2e-7) of the channel's
                                           largest value: reassociation across a deep
                                           stack, two orders below the 1e-3 of the
                                           range a wrong value shows.
float16        2e-2    2e-2    1e-3        11-bit significand (ε ≈ 9.8e-4) rounded at
                                           every layer: ~1 % of the output's range
                                           after 50 layers. range_rtol 1e-3 is one
                                           ulp at the channel's largest value (one
                                           rounding of a sum that passed through it).
bfloat16       1e-1    1e-1    1e-2        8-bit significand (ε ≈ 7.8e-3); range_rtol
                                           1e-2: one ulp at the channel's largest
                                           value, as for float16.
int8           —       —       —           elementwise closeness is not the question
                                           for a quantized graph (errors of ~1 % of
                                           the range are the design); see below.
=============  ======  ======  ==========  ===========================================

Every caller that takes ``rtol``/``atol`` also takes ``range_rtol`` (``export(...,
verify_range_rtol=)``, ``export --range-rtol``, ``check_parity(range_rtol=)``, ``parity
--range-rtol``); ``0`` restores the plain ``allclose`` rule.

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
        range_rtol: tolerance relative to the channel's ``max|ref|`` (the range term).
        min_top1: when set, pass/fail is top-1 agreement >= this on class-score
            outputs (and cosine >= ``min_cosine`` on the others), not ``rtol``/``atol``.
        min_cosine: see ``min_top1``.
    """

    rtol: float
    atol: float
    range_rtol: float = 0.0
    min_top1: float | None = None
    min_cosine: float | None = None


DEFAULTS: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 1e-4, 1e-5),
    "float16": Tolerance(2e-2, 2e-2, 1e-3),
    "bfloat16": Tolerance(1e-1, 1e-1, 1e-2),
    "int8": Tolerance(1e-1, 1e-1, 1e-2, min_top1=INT8_MIN_TOP1, min_cosine=INT8_MIN_COSINE),
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


def default_range_rtol(precision: Any) -> float:
    """``range_rtol`` for ``precision`` (see :func:`precision_name`)."""
    return default_tolerance(precision).range_rtol


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis whose entries get their own ``max|ref|``: the last one for rank >= 2.

    Exported graphs keep the Keras layout at their outputs (``channels_last``; a
    ``Dense`` output's last axis is its features), so the last axis is the channel.
    ``None`` (one range for the whole output) for scalars and vectors.
    """
    return len(shape) - 1 if len(shape) >= 2 else None


def channel_range(ref: Any) -> np.ndarray:
    """``max|ref|`` per output channel (:func:`channel_axis`), broadcastable against ``ref``.

    Non-finite reference values are left out (they fail the comparison anyway); an empty
    tensor has range 0. float64, with ``ref``'s rank (size-1 axes but the channel's).
    """
    a = np.abs(np.asarray(ref, np.float64))
    a = np.where(np.isfinite(a), a, 0.0)
    if a.size == 0:
        return np.zeros((1,) * a.ndim)
    axis = channel_axis(a.shape)
    if axis is None:
        return np.full((1,) * a.ndim, float(a.max()))
    others = tuple(i for i in range(a.ndim) if i != axis)
    return a.max(axis=others, keepdims=True)


def bounds(ref: np.ndarray, rtol: float, atol: float, range_rtol: float = 0.0) -> np.ndarray:
    """Allowed ``|out − ref|`` per element: ``atol + rtol·|ref| + range_rtol·max|ref|``.

    ``max|ref|`` per channel (:func:`channel_range`); float64, ``ref``'s shape.
    """
    r = np.asarray(ref, np.float64)
    bound = atol + rtol * np.abs(r)
    if range_rtol:
        bound = bound + range_rtol * channel_range(r)
    return np.broadcast_to(bound, r.shape)


def exceeds(
    absdiff: np.ndarray,
    absref: np.ndarray,
    rtol: float,
    atol: float,
    range_rtol: float = 0.0,
    ref_range: Any = 0.0,
) -> np.ndarray:
    """The criterion on precomputed ``|out − ref|`` and ``|ref|``: mask of failing elements.

    ``ref_range`` is the ``max|ref|`` of each element's channel (broadcastable, e.g. from
    :func:`channel_range`), used with ``range_rtol``. A NaN difference compares False
    with its bound, so it counts as a violation.
    """
    with np.errstate(invalid="ignore"):
        bound = atol + rtol * absref
        if range_rtol:
            bound = bound + range_rtol * np.asarray(ref_range, np.float64)
        return ~(absdiff <= bound)


def violations(ref: Any, out: Any, rtol: float, atol: float, range_rtol: float = 0.0) -> np.ndarray:
    """Boolean mask of the elements that fail the criterion (non-finite ones included).

    ``ref`` and ``out`` must have the same shape; compared in float64.
    """
    r = np.asarray(ref, np.float64)
    o = np.asarray(out, np.float64)
    span = channel_range(r) if range_rtol else 0.0
    with np.errstate(invalid="ignore"):
        bad = exceeds(np.abs(o - r), np.abs(r), rtol, atol, range_rtol, span)
    return bad | ~np.isfinite(r) | ~np.isfinite(o)


def allclose(ref: Any, out: Any, rtol: float, atol: float, range_rtol: float = 0.0) -> bool:
    """Whether every element passes (same shape required; see the module docstring)."""
    r, o = np.asarray(ref), np.asarray(out)
    return r.shape == o.shape and not bool(violations(r, o, rtol, atol, range_rtol).any())


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
