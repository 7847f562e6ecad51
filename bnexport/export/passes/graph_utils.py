"""Small onnx-ir helpers shared by the folding passes (constants, uses, names, dtypes)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from bnexport.errors import FoldError

Float16Policy = Literal["float32", "error"]

#: float16's largest finite value
FLOAT16_MAX = 65504.0
#: the smallest positive float16 (subnormal); anything below rounds to zero
FLOAT16_TINY = 2.0**-24

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or ``Constant`` node), else ``None``.

    An initializer that is also a graph input can be overridden at run time, so it
    does not count as a constant.
    """
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The one node using ``value`` exactly once, if ``value`` is not a graph output.

    A consumer inside a subgraph (If/Loop body) does not count: the passes edit only
    the graph that owns ``value``.
    """
    if value.is_graph_output():
        return None
    uses = value.uses()
    if len(uses) != 1:
        return None
    node = next(iter(uses)).node
    return node if node.graph is value.graph else None


def rank_of(value: ir.Value) -> int | None:
    """Rank of ``value`` from its shape, or from a producing Conv/ConvTranspose weight."""
    if value.shape is not None:
        return value.shape.rank()
    producer = value.producer()
    if producer is not None and producer.op_type in ("Conv", "ConvTranspose"):
        weight = const_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        if weight is not None:
            return weight.ndim
    return None


def static_dim(value: ir.Value, axis: int) -> int | None:
    """The static size of ``value``'s dimension ``axis`` (negative allowed), else ``None``."""
    shape = value.shape
    if shape is None or not -shape.rank() <= axis < shape.rank():
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def attr_int(node: ir.Node, name: str, default: int) -> int:
    """Integer attribute ``name`` of ``node`` or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_float(node: ir.Node, name: str, default: float) -> float:
    """Float attribute ``name`` of ``node`` or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def attr_ints(node: ir.Node, name: str) -> tuple[int, ...] | None:
    """Integer-list attribute ``name`` of ``node`` or ``None``."""
    attr = node.attributes.get(name)
    return None if attr is None else tuple(attr.as_ints())


def attr_str(node: ir.Node, name: str, default: str) -> str:
    """String attribute ``name`` of ``node`` or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def transpose_perm(node: ir.Node, rank: int) -> list[int]:
    """The ``perm`` of a ``Transpose`` node (default: reversed axes)."""
    perm = attr_ints(node, "perm")
    return list(perm) if perm is not None else list(reversed(range(rank)))


class Namer:
    """Fresh, graph-unique value and node names (scans the graph once)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = {v.name for v in graph.inputs if v.name}
        self._taken.update(graph.initializers)
        for node in graph:
            if node.name:
                self._taken.add(node.name)
            self._taken.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str) -> str:
        """Return ``base`` or ``base_N``, unused so far, and reserve it."""
        name, n = base, 1
        while name in self._taken:
            name, n = f"{base}_{n}", n + 1
        self._taken.add(name)
        return name


def add_initializer(graph: ir.Graph, namer: Namer, array: np.ndarray, base: str) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base``; return its value."""
    name = namer.fresh(base)
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, const_value=tensor)
    graph.register_initializer(value)
    return value


def np_dtype(dtype: ir.DataType) -> np.dtype:
    """NumPy dtype of an ONNX float type."""
    return np.dtype(dtype.numpy())


@dataclasses.dataclass
class Folded:
    """A folded float64 tensor cast to the graph dtype, or kept float32 where it must."""

    array: np.ndarray
    float32: bool  # True when the value does not fit float16 and was kept in float32
    why: str = ""


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
    why = ""
    peak = float(np.abs(array64).max(initial=0.0))
    if peak > FLOAT16_MAX:
        why = f"folded {what} overflows float16 (max |value| {peak:.4g} > 65504)"
    elif reference is not None and array64.ndim >= 1 and array64.shape == reference.shape:
        flat = np.abs(array64.reshape(array64.shape[0], -1))
        had = np.abs(reference.reshape(reference.shape[0], -1)).max(axis=1) > 0
        lost = had & (flat.max(axis=1) < FLOAT16_TINY)
        if lost.any():
            why = (
                f"folded {what} underflows float16 (slice {int(np.argmax(lost))} "
                "would become all zeros)"
            )
    if not why:
        return Folded(array64.astype(np.float16), float32=False)
    if policy == "error":
        raise FoldError(f"{node}: {why}")
    return Folded(array64.astype(np.float32), float32=True, why=why)
