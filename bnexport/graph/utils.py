"""Small onnx-ir helpers shared by the passes: constants, uses, names, dtypes, rewiring."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx_ir as ir

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


def transpose_perm(node: ir.Node, rank: int) -> list[int]:
    """The ``perm`` of a ``Transpose`` node (default: reversed axes)."""
    perm = node.attributes.get_ints("perm")
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


def take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Let ``new`` replace ``old`` everywhere (graph outputs too) and inherit its name.

    ``old``'s producer is removed once none of its outputs is used any more; ``new`` is
    renamed, so nothing may depend on its previous name.
    """
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    producer = old.producer()
    if (
        producer is not None
        and producer.graph is graph
        and not any(v.uses() or v.is_graph_output() for v in producer.outputs)
    ):
        graph.remove(producer, safe=True)
    old.name = None
    new.name = name
    if old.shape is not None and new.shape is None:
        new.shape = old.shape


def append_to(
    graph: ir.Graph,
    namer: Namer,
    value: ir.Value,
    node: ir.Node,
    *,
    suffix: str,
    skip: Collection[ir.Node] = (),
    outputs_only: bool = False,
) -> ir.Value:
    """Insert ``node`` (which reads ``value``) right where ``value`` is computed.

    ``node``'s first output takes over ``value``'s name, type and shape, and its place
    as a graph output; unless ``outputs_only``, every other reader of ``value`` (except
    the nodes in ``skip``) reads it too. ``value`` is renamed ``<name>_<suffix>``.

    Returns:
        ``node``'s first output.
    """
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    elif len(graph):
        graph.insert_before(graph.node(0), node)
    else:
        graph.append(node)
    new = node.outputs[0]
    if not outputs_only:
        for use in list(value.uses()):
            if use.node is not node and use.node not in skip:
                use.node.replace_input_with(use.idx, new)
    outputs = graph.outputs
    for k, out in enumerate(outputs):
        if out is value:
            outputs[k] = new
    name = value.name
    value.name = namer.fresh(f"{name}_{suffix}")
    new.name, new.type, new.shape = name, value.type, value.shape
    return new
