"""float16's range and float32 islands: the one home for both.

A float16 tensor holds finite magnitudes up to ``FLOAT16_MAX = 65504``; below
``FLOAT16_TINY = 2**-24`` (the smallest subnormal) a value rounds to zero. A weight that
does not fit is never written as ``inf`` or a flushed-to-zero slice. Instead the op that
needs it runs in float32 — a *float32 island*::

    x (float16) ─ Cast(to=float) ─ op … op (float32 weights) ─ Cast(to=float16) ─ y (float16)

The island's output keeps its name and its consumers; only the inner float32 value is
renamed (``<name>_float32``). Used by the fold passes (a folded weight that overflows or
underflows) and by :func:`bnexport.graph.float16.convert_to_float16` (a float32 weight
that overflows float16).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from bnexport.errors import FoldError
from bnexport.graph.utils import Namer, append_to, np_dtype

#: what to do with a tensor that does not fit float16: run its op in float32, or raise
Float16Policy = Literal["float32", "error"]

#: float16's largest finite value
FLOAT16_MAX = 65504.0
#: the smallest positive float16 (subnormal); anything below rounds to zero
FLOAT16_TINY = 2.0**-24


def float16_peak(array: np.ndarray) -> float:
    """Largest finite magnitude of ``array`` (0 for an empty or all-non-finite array)."""
    finite = np.abs(array[np.isfinite(array)])
    return float(finite.max(initial=0.0))


def overflows_float16(array: np.ndarray) -> bool:
    """Whether a finite element of ``array`` exceeds ``±FLOAT16_MAX`` (would become inf)."""
    return float16_peak(array) > FLOAT16_MAX


@dataclasses.dataclass
class Folded:
    """A folded float64 tensor cast to the graph dtype, or kept float32 where it must."""

    array: np.ndarray
    float32: bool  # True when the value does not fit float16 and was kept in float32
    why: str = ""


def _float16_misfit(what: str, array64: np.ndarray, reference: np.ndarray | None) -> str:
    """Why ``array64`` does not fit float16 (overflow, or a slice flushed to zero), or ``""``."""
    peak = float16_peak(array64)
    if peak > FLOAT16_MAX:
        return f"folded {what} overflows float16 (max |value| {peak:.4g} > {FLOAT16_MAX:g})"
    if reference is None or array64.ndim < 1 or array64.shape != reference.shape:
        return ""
    flat = np.abs(array64.reshape(array64.shape[0], -1))
    had = np.abs(reference.reshape(reference.shape[0], -1)).max(axis=1) > 0
    lost = had & (flat.max(axis=1) < FLOAT16_TINY)
    if lost.any():
        slice_ = int(np.argmax(lost))
        return f"folded {what} underflows float16 (slice {slice_} would become all zeros)"
    return ""


def cast_folded(
    array64: np.ndarray,
    dtype: ir.DataType,
    *,
    what: str,
    node: str,
    policy: Float16Policy,
    reference: np.ndarray | None = None,
) -> Folded:
    """Cast a folded float64 tensor to ``dtype``, refusing a silent float16 overflow.

    A float16 result is rejected when an element exceeds ±65504 (it would become inf),
    or when an output slice along axis 0 that had a nonzero ``reference`` value
    flushes entirely to zero (``|w| < 2**-24``). Then ``policy="error"`` raises and
    ``policy="float32"`` returns a float32 array with ``float32=True``.

    Raises:
        FoldError: a non-finite folded value, or a float16 misfit under ``policy="error"``.
    """
    if not np.isfinite(array64).all():
        raise FoldError(f"{node}: folded {what} has non-finite values")
    if dtype != ir.DataType.FLOAT16:
        limit = np.finfo(np_dtype(dtype)).max
        if np.abs(array64).max(initial=0.0) > limit:
            raise FoldError(f"{node}: folded {what} overflows {dtype.name.lower()}")
        return Folded(array64.astype(np_dtype(dtype)), float32=False)
    why = _float16_misfit(what, array64, reference)
    if not why:
        return Folded(array64.astype(np.float16), float32=False)
    if policy == "error":
        raise FoldError(f"{node}: {why}")
    return Folded(array64.astype(np.float32), float32=True, why=why)


def storage_dtype(casts: Sequence[Folded], dtype: ir.DataType) -> tuple[np.dtype, str]:
    """NumPy dtype to store a node's folded tensors in, and why (``""`` unless an island).

    float32 for all of them as soon as one had to stay float32 (the node becomes a float32
    island), else ``dtype``'s NumPy type.
    """
    misfits = [c.why for c in casts if c.float32]
    if misfits:
        return np.dtype(np.float32), misfits[0]
    return np_dtype(dtype), ""


def cast_node(value: ir.Value, to: ir.DataType, namer: Namer, base: str) -> ir.Node:
    """A ``Cast(value, to)`` node (not inserted) with a typed output."""
    node = ir.node("Cast", [value], {"to": to}, name=namer.fresh(base))
    node.outputs[0].name = namer.fresh(f"{value.name}_{to.name.lower()}")
    node.outputs[0].type = ir.TensorType(to)
    node.outputs[0].shape = value.shape
    return node


def _casts_up(value: ir.Value | None, run: set[ir.Node], dtype: ir.DataType) -> bool:
    """Whether an island input needs a ``Cast`` to float32.

    It does when it is a ``dtype`` (or untyped) value computed outside the island;
    constants were already stored in float32.
    """
    if value is None or value.const_value is not None or value.dtype not in (dtype, None):
        return False
    return value.producer() not in run


def run_in_float32(
    graph: ir.Graph, namer: Namer, nodes: Sequence[ir.Node], dtype: ir.DataType
) -> None:
    """Run ``nodes`` (a chain, in graph order) in float32 between ``Cast`` nodes.

    Every ``dtype`` (or untyped) input computed outside the island and not a constant is
    cast to float32 in front of the node that reads it; every float output used outside
    the island (or a graph output) is cast back to ``dtype`` and keeps its name and
    consumers. Float constants the nodes read must already be float32.
    """
    run = set(nodes)
    for node in nodes:
        cast_in: dict[ir.Value, ir.Value] = {}
        for i, value in enumerate(node.inputs):
            if not _casts_up(value, run, dtype):
                continue
            if value not in cast_in:
                cast = cast_node(value, ir.DataType.FLOAT, namer, f"{node.name}_cast_in")
                graph.insert_before(node, cast)
                cast_in[value] = cast.outputs[0]
            node.replace_input_with(i, cast_in[value])
    for node in nodes:
        for out in node.outputs:
            if out.dtype not in (dtype, ir.DataType.FLOAT, None):
                continue  # e.g. an integer output: not part of the float computation
            out.type = ir.TensorType(ir.DataType.FLOAT)
            outside = [u for u in out.uses() if u.node not in run]
            if not outside and not out.is_graph_output():
                continue
            cast = ir.node("Cast", [out], {"to": dtype}, name=namer.fresh(f"{node.name}_cast_out"))
            back = append_to(graph, namer, out, cast, suffix="float32", skip=run)
            back.type = ir.TensorType(dtype)
