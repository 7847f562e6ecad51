"""Move tf2onnx's layout ops off a BN's ``Mul``/``Add`` chain, so the fold pass reaches it.

tf2onnx converts NHWC models by transposing to NCHW around each convolution and then
pushing the transposes *down* the graph. A BN applied to a graph input (or to anything
tf2onnx cannot push a transpose through) therefore ends up as::

    x ─ Mul(scale[C]) ─ Add(shift[C]) ─ Transpose(perm) ─ Conv

where the fold pass cannot see the ``Conv`` behind the ``Transpose``. Because the BN is
per-channel, it commutes with any transpose once its constants are re-laid out::

    Transpose(perm)(x · s + b) = Transpose(perm)(x) · s' + b'

with ``s'``, ``b'`` of shape ``[1, …, C, …, 1]``, ``C`` at ``perm.index(channel_axis)``.
:class:`SinkTransposesPass` rewrites to ``x ─ Transpose ─ Mul(s') ─ Add(b') ─ Conv`` so the
BN can fold backward (or become one ``BatchNormalization`` with channel axis 1). The
``Add`` keeps its output name (the tensor of the BN layer), node names are unchanged.

Likewise tf2onnx writes ``Conv1D`` as ``Unsqueeze → Conv → Squeeze`` and ``Dense`` on a
rank-3 input as ``Reshape → MatMul → Reshape``, so the bias ``Add`` and the BN sit behind a
shape op. A per-channel affine map commutes with it when the channel axis survives:
``Squeeze`` (constants get the squeezed axes back as size-1 dims) or a ``Reshape`` that
keeps the last dimension, along which every constant varies. :class:`SinkReshapesPass`
moves the chain (``Mul``/``Add`` by constants, single consumers, up to the last BN node)
in front of the shape op, which takes over the chain's output name. It needs static
shapes (:mod:`.shapes`); when inference fails, a chain it could not move is logged with
the inference error.

Only nodes named in ``bn_nodes`` (tf2onnx node name -> Keras layer) are moved.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bnexport.graph.shapes import infer_shapes
from bnexport.graph.utils import (
    Namer,
    add_initializer,
    const_array,
    rank_of,
    single_consumer,
)

log = logging.getLogger(__name__)


def _split_const(node: ir.Node) -> tuple[ir.Value, int, np.ndarray] | None:
    """``(data input, index of the constant input, constant)`` of a binary node, else None."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    consts = [const_array(v) for v in node.inputs]
    if sum(c is not None for c in consts) != 1:
        return None
    k = 0 if consts[0] is not None else 1
    return node.inputs[1 - k], k, consts[k]


def _channel_vector(array: np.ndarray, rank: int) -> np.ndarray | None:
    """``array`` as ``[C]`` if it broadcasts only along the last axis of a rank-``rank`` tensor."""
    if array.ndim > rank or array.ndim == 0:
        return None
    if any(d != 1 for d in array.shape[:-1]):
        return None
    return array.reshape(-1)


def _chain_link(node: ir.Node | None, op: str, bn_nodes: Mapping[str, str]) -> bool:
    """``node`` is a BN-derived ``op`` whose output feeds exactly one node."""
    return (
        node is not None
        and node.op_type == op
        and node.domain == ""
        and node.name in bn_nodes
        and single_consumer(node.outputs[0]) is not None
    )


class _LayoutPass(ir.passes.InPlacePass):
    """A pass over the main graph's BN-derived nodes (``bn_nodes``: name -> layer)."""

    candidates: tuple[str, ...] = ()  # op types of the layout ops to move

    def __init__(self, bn_nodes: Mapping[str, str]) -> None:
        super().__init__()
        self.bn_nodes = bn_nodes
        self.moved = 0

    def sink(self, model: ir.Model, namer: Namer, node: ir.Node) -> ir.Node | None:
        """Move the BN chain next to ``node`` (a layout op); return the moved op, or None."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Sink every candidate until none moves (a moved op may unlock another chain)."""
        namer = Namer(model.graph)
        work = [n for n in model.graph if n.op_type in self.candidates and n.domain == ""]
        work.reverse()
        while work:
            moved = self.sink(model, namer, work.pop())
            if moved is not None:
                self.moved += 1
                work.append(moved)
        return ir.passes.PassResult(model, self.moved > 0)


class SinkTransposesPass(_LayoutPass):
    """Rewrite ``Mul → Add → Transpose`` BN chains to ``Transpose → Mul → Add``."""

    candidates = ("Transpose",)

    def sink(self, model: ir.Model, namer: Namer, node: ir.Node) -> ir.Node | None:
        """Move ``node`` (a Transpose) in front of the BN ``Mul``/``Add`` feeding it."""
        graph = model.graph
        if node.graph is not graph or node.outputs[0].is_graph_output():
            return None
        add = node.inputs[0].producer()
        if not _chain_link(add, "Add", self.bn_nodes) or (add_split := _split_const(add)) is None:
            return None
        mul = add_split[0].producer()
        if not _chain_link(mul, "Mul", self.bn_nodes) or (mul_split := _split_const(mul)) is None:
            return None
        x = mul_split[0]
        perm = node.attributes.get_ints("perm")
        rank = len(perm) if perm is not None else rank_of(x)
        if rank is None:
            return None
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        scale, shift = _channel_vector(mul_split[2], rank), _channel_vector(add_split[2], rank)
        if scale is None or shift is None:
            return None
        shape = [1] * rank
        shape[perm.index(rank - 1)] = scale.size
        moved = ir.node("Transpose", [x], {"perm": perm}, name=node.name)
        moved.outputs[0].name = namer.fresh(f"{node.outputs[0].name}_bnexport_moved")
        moved.outputs[0].type = x.type
        graph.insert_before(mul, moved)
        s_new = scale.reshape(shape).astype(mul_split[2].dtype)
        b_new = shift.reshape(shape).astype(add_split[2].dtype)
        mul.replace_input_with(0, moved.outputs[0])
        mul.replace_input_with(1, add_initializer(graph, namer, s_new, f"{mul.name}_scale_nc"))
        add.replace_input_with(0, mul.outputs[0])
        add.replace_input_with(1, add_initializer(graph, namer, b_new, f"{add.name}_shift_nc"))
        node.outputs[0].replace_all_uses_with(add.outputs[0])
        graph.remove(node, safe=True)
        for value in (mul.outputs[0], add.outputs[0]):
            value.shape = None  # their layout changed
        return moved


def _squeeze_axes(node: ir.Node) -> list[int] | None:
    """A ``Squeeze``'s axes: its second input (opset >= 13) or attribute; None if unknown."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return None if (axes := node.attributes.get_ints("axes")) is None else list(axes)


def _static(value: ir.Value) -> list[int | None] | None:
    """``value``'s dims (``None`` for a symbolic one), or ``None`` for an unknown/scalar shape."""
    if value.shape is None or value.shape.rank() == 0:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def relayout(
    shape_op: ir.Node, consts: list[np.ndarray], src: list[int | None], dst: list[int | None]
) -> list[np.ndarray] | None:
    """Constants re-laid out for ``shape_op``'s input, or ``None`` if they don't commute."""
    channels = dst[-1]
    if channels is None:
        return None
    if shape_op.op_type == "Reshape":
        if src[-1] != channels:
            return None
        if any(c.ndim > 1 and any(d != 1 for d in c.shape[:-1]) for c in consts):
            return None  # only last-axis vectors (or scalars) commute with a reshape
        return [c.reshape(-1) if c.ndim else c for c in consts]
    axes = _squeeze_axes(shape_op)
    if axes is None:
        return None
    axes = sorted(a % len(src) for a in axes)
    out = []
    for c in consts:
        if c.ndim > len(dst):
            return None
        full = c.reshape((1,) * (len(dst) - c.ndim) + c.shape)
        for axis in axes:
            full = np.expand_dims(full, axis)
        out.append(full)
    return out


class SinkReshapesPass(_LayoutPass):
    """Move a ``Squeeze``/``Reshape`` below the BN ``Mul``/``Add`` chain that follows it."""

    candidates = ("Squeeze", "Reshape")

    def __init__(self, bn_nodes: Mapping[str, str]) -> None:
        super().__init__(bn_nodes)
        self.shape_error: str | None = None
        self._inferred = False

    def _chain(self, shape_op: ir.Node) -> tuple[list[ir.Node], list[tuple[int, np.ndarray]]]:
        """The ``Mul``/``Add``-by-constant chain after ``shape_op``, up to its last BN node."""
        chain: list[ir.Node] = []
        consts: list[tuple[int, np.ndarray]] = []
        node = single_consumer(shape_op.outputs[0])
        while node is not None and node.op_type in ("Mul", "Add") and node.domain == "":
            split = _split_const(node)
            if split is None:
                break
            chain.append(node)
            consts.append(split[1:])
            node = single_consumer(node.outputs[0])
        last_bn = max((k for k, n in enumerate(chain) if n.name in self.bn_nodes), default=-1)
        return chain[: last_bn + 1], consts[: last_bn + 1]

    def _shapes(self, shape_op: ir.Node) -> tuple[list[int | None], list[int | None]] | None:
        """Static input and output dims of ``shape_op``, or None (logged) if unknown."""
        src, dst = _static(shape_op.inputs[0]), _static(shape_op.outputs[0])
        if src is None or dst is None:
            failed = f" (shape inference failed: {self.shape_error})" if self.shape_error else ""
            log.warning(
                "%s '%s': shapes unknown, the BN chain after it stays behind it%s",
                shape_op.op_type, shape_op.name, failed,
            )  # fmt: skip
            return None
        return src, dst

    def sink(self, model: ir.Model, namer: Namer, node: ir.Node) -> ir.Node | None:
        """Move the BN chain after ``node`` (a Squeeze/Reshape) in front of it."""
        graph = model.graph
        if node.graph is not graph:
            return None
        chain, consts = self._chain(node)
        if not chain:
            return None
        if not self._inferred:  # shapes only once a candidate needs them
            self.shape_error, self._inferred = infer_shapes(model), True
        shapes = self._shapes(node)
        new_consts = None if shapes is None else relayout(node, [c for _, c in consts], *shapes)
        if new_consts is None:
            return None
        # rewire: x -> chain -> shape op -> (the chain's old consumers)
        x, final, dst_shape = node.inputs[0], chain[-1].outputs[0], node.outputs[0].shape
        chain[0].replace_input_with(1 - consts[0][0], x)
        for link, (k, _), array in zip(chain, consts, new_consts, strict=True):
            value = add_initializer(graph, namer, array, f"{link.name}_const_relayout")
            link.replace_input_with(k, value)
        moved = ir.node(node.op_type, [final, *node.inputs[1:]], node.attributes, name=node.name)
        graph.insert_after(chain[-1], moved)
        graph.remove(node, safe=True)
        name = final.name
        final.replace_all_uses_with(moved.outputs[0], replace_graph_outputs=True)
        moved.replace_input_with(0, final)
        final.name = namer.fresh(f"{name}_bnexport_presqueeze")
        out = moved.outputs[0]
        out.name, out.type, out.shape = name, final.type, dst_shape
        for link in chain:
            link.outputs[0].shape = x.shape
        return moved


def sink_layout_ops(model: onnx.ModelProto, bn_nodes: Mapping[str, str]) -> onnx.ModelProto:
    """Run :class:`SinkTransposesPass` then :class:`SinkReshapesPass` on ``model``.

    Args:
        model: an ``onnx.ModelProto`` from tf2onnx (not modified).
        bn_nodes: names of BN-derived nodes (only those are moved).

    Returns:
        The rewritten model (unused initializers dropped), or ``model`` itself when
        nothing moved.
    """
    if not any(node.name in bn_nodes for node in model.graph.node):
        return model
    ir_model = ir.serde.deserialize_model(model)
    passes = [SinkTransposesPass(bn_nodes), SinkReshapesPass(bn_nodes)]
    if not ir.passes.Sequential(*passes)(ir_model).modified:
        return model
    RemoveUnusedNodesPass()(ir_model)
    return ir.serde.serialize_model(ir_model)
