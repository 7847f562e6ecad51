"""Fuse: a normalization that cannot fold becomes exactly one node.

``fused_norm="onnx"``: an inference ``BatchNormalization(x, γ=scale, β=shift, μ=0, var=1)``
with ``epsilon=0`` — ``(x − 0)/√(1 + 0)·scale + shift`` is exactly ``x·scale + shift`` —
when the channel axis is 1; a lone ``Mul`` (zero shift) or ``Add`` (unit scale) when one
suffices. No single standard op applies a per-channel affine on another axis (e.g. NHWC),
so there the chain becomes ``Mul`` + ``Add`` (two nodes; the report says so). In a
float16 graph whose scale/shift does not fit float16 the node runs in float32 between
``Cast`` nodes (``keep_float16_overflow="float32"``) or the fold fails (``"error"``).

``fused_norm="plugin"``: one ``bnexport::FusedNorm`` node (attributes from
``bnexport_plugins.fused_norm.spec``; float32 ``scale``/``shift``), which also absorbs a
following activation when the normalized value feeds only it: ``Relu``, ``Clip(0, 6)``
(relu6), ``LeakyRelu``, ``Sigmoid``, or ``x·Sigmoid(x)`` (SiLU).

A lone per-channel ``Mul``/``Div`` that is not a BN (a layer scale) is already one node;
in both modes it stays one ``Mul`` and is reported as ``kept``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from bnexport_plugins.fused_norm import spec as fn_spec

from bnexport.export.passes.context import (
    INTERNAL_DOMAIN,
    AffineSpec,
    FoldContext,
    FoldPass,
    placeholders,
    spec_of,
)
from bnexport.graph.islands import cast_folded, run_in_float32, storage_dtype
from bnexport.graph.utils import (
    add_initializer,
    const_array,
    single_consumer,
    take_over,
)


@dataclasses.dataclass
class Activation:
    """An activation a FusedNorm node can absorb."""

    kind: str  # one of spec.ACTIVATIONS
    alpha: float
    nodes: list[ir.Node]
    output: ir.Value


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if len(node.inputs) > 1:  # opset >= 11: min/max are inputs
        bounds = []
        for i in (1, 2):
            value = node.inputs[i] if len(node.inputs) > i else None
            array = const_array(value) if value is not None else None
            bounds.append(None if array is None or array.size != 1 else float(array.flat[0]))
        return bounds[0], bounds[1]
    low, high = node.attributes.get("min"), node.attributes.get("max")
    return (
        None if low is None else low.as_float(),
        None if high is None else high.as_float(),
    )


def find_activation(y: ir.Value) -> Activation | None:
    """The activation that alone consumes ``y``, if FusedNorm can absorb it."""
    if y.is_graph_output():
        return None
    uses = list(y.uses())
    nodes = [u.node for u in uses]
    if any(n.domain != "" or n.graph is not y.graph for n in nodes):
        return None
    if len(uses) == 1:
        node = nodes[0]
        op = node.op_type
        if op == "Relu":
            return Activation("relu", 0.01, [node], node.outputs[0])
        if op == "Sigmoid":
            return Activation("sigmoid", 0.01, [node], node.outputs[0])
        if op == "LeakyRelu":
            return Activation(
                "leaky_relu", node.attributes.get_float("alpha", 0.01), [node], node.outputs[0]
            )
        if op == "Clip" and node.inputs[0] is y and _clip_bounds(node) == (0.0, 6.0):
            return Activation("relu6", 0.01, [node], node.outputs[0])
        return None
    if len(uses) == 2:
        sig = next((n for n in nodes if n.op_type == "Sigmoid"), None)
        mul = next((n for n in nodes if n.op_type == "Mul"), None)
        if sig is None or mul is None or single_consumer(sig.outputs[0]) is not mul:
            return None
        if {id(v) for v in mul.inputs} == {id(y), id(sig.outputs[0])}:
            return Activation("silu", 0.01, [sig, mul], mul.outputs[0])
    return None


def take_over_activation(
    graph: ir.Graph, y: ir.Value, new: ir.Value, act: Activation | None
) -> None:
    """``new`` takes over ``y`` — or the output of ``act``, the activation it absorbed.

    ``y``'s producer goes once unused; so do the absorbed activation's nodes.
    """
    if act is None:
        take_over(graph, y, new)
        return
    producer = y.producer()
    take_over(graph, act.output, new)
    graph.remove([n for n in reversed(act.nodes) if n.graph is graph], safe=True)
    if producer is not None and producer.graph is graph:
        graph.remove(producer, safe=True)


def fused_norm_node(
    graph: ir.Graph,
    ctx: FoldContext,
    x: ir.Value,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    name: str,
    num_outputs: int = 1,
    **attributes: int | float | str,
) -> ir.Node:
    """A ``bnexport::FusedNorm`` node (not inserted) with float32 scale/shift initializers."""
    namer = ctx.namer(graph)
    tensors = []
    for what, array in (("scale", scale), ("shift", shift)):
        cast = cast_folded(array, ir.DataType.FLOAT, what=what, node=name, policy="error")
        tensors.append(add_initializer(graph, namer, cast.array, f"{name}_{what}"))
    graph.opset_imports[fn_spec.DOMAIN] = fn_spec.OPSET_VERSION
    node = ir.node(
        fn_spec.OP_TYPE,
        [x, *tensors],
        fn_spec.node_attributes(**attributes),
        domain=fn_spec.DOMAIN,
        num_outputs=num_outputs,
        name=namer.fresh(name),
    )
    node.outputs[0].type = x.type
    node.outputs[0].shape = x.shape
    for out in node.outputs[1:]:
        out.type = ir.TensorType(ir.DataType.FLOAT)
    return node


def _constant(graph: ir.Graph, ctx: FoldContext, array: np.ndarray, base: str) -> ir.Value:
    return add_initializer(graph, ctx.namer(graph), array, base)


def fuse_onnx(graph: ir.Graph, ph: ir.Node, spec: AffineSpec, ctx: FoldContext) -> tuple[str, str]:
    """Replace ``ph`` by one standard ONNX node; return (target name, note)."""
    name = ph.name or ctx.namer(graph).fresh(spec.labels[0])  # ph is removed below
    scale = cast_folded(spec.scale, spec.dtype, what="scale", node=name, policy=ctx.float16_policy)
    shift = cast_folded(spec.shift, spec.dtype, what="shift", node=name, policy=ctx.float16_policy)
    dtype, why = storage_dtype([scale, shift], spec.dtype)
    x, shape = ph.inputs[0], spec.broadcast_shape()
    namer = ctx.namer(graph)
    note = ""
    if not spec.shift.any() or (spec.scale == 1).all():
        op = "Add" if spec.shift.any() else "Mul"
        array = spec.shift if op == "Add" else spec.scale
        const = _constant(graph, ctx, array.astype(dtype).reshape(shape), f"{name}_{op.lower()}")
        nodes = [ir.node(op, [x, const], name=name)]
    elif spec.positive_axis == 1:
        c = spec.channels
        params = [
            _constant(graph, ctx, spec.scale.astype(dtype), f"{name}_scale"),
            _constant(graph, ctx, spec.shift.astype(dtype), f"{name}_shift"),
            _constant(graph, ctx, np.zeros(c, dtype), f"{name}_mean"),
            _constant(graph, ctx, np.ones(c, dtype), f"{name}_var"),
        ]
        nodes = [ir.node("BatchNormalization", [x, *params], {"epsilon": 0.0}, name=name)]
    else:
        mul_c = _constant(graph, ctx, spec.scale.astype(dtype).reshape(shape), f"{name}_mul")
        add_c = _constant(graph, ctx, spec.shift.astype(dtype).reshape(shape), f"{name}_add")
        mul = ir.node("Mul", [x, mul_c], name=name)
        nodes = [mul, ir.node("Add", [mul.outputs[0], add_c], name=namer.fresh(f"{name}_add"))]
        note = f"channel axis {spec.positive_axis} is not 1: no single ONNX op, Mul+Add"
    for node in nodes:
        node.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(dtype))
        node.outputs[0].shape = x.shape
    graph.insert_before(ph, nodes)
    take_over(graph, ph.outputs[0], nodes[-1].outputs[0])
    if why:
        run_in_float32(graph, namer, nodes, spec.dtype)
        note = "; ".join(filter(None, [note, f"kept in float32: {why}"]))
    return "+".join(n.name or "" for n in nodes), note


def fuse_plugin(
    graph: ir.Graph, ph: ir.Node, spec: AffineSpec, ctx: FoldContext
) -> tuple[str, str]:
    """Replace ``ph`` (and an absorbable activation) by one FusedNorm node."""
    y = ph.outputs[0]
    act = find_activation(y)
    attrs: dict[str, int | float | str] = {"axis": spec.positive_axis, "mode": "affine"}
    if act is not None:
        attrs.update(activation=act.kind, alpha=act.alpha)
    node = fused_norm_node(
        graph, ctx, ph.inputs[0], spec.scale, spec.shift, name=ph.name or spec.labels[0], **attrs
    )
    if ph.name:
        node.name = ph.name  # ph is removed below
    graph.insert_before(ph, node)
    take_over_activation(graph, y, node.outputs[0], act)
    return node.name or "", "" if act is None else f"{act.kind} absorbed"


class FuseNormPass(FoldPass):
    """Turn every remaining placeholder into exactly one node (ONNX op or FusedNorm)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fuse each placeholder; record why folding was refused."""
        graph = model.graph
        phs = placeholders(graph)
        for ph in phs:
            spec = spec_of(ph)
            lone = len(spec.sources) == 1 and not spec.has_bn  # one Mul/Div: stays one Mul
            plugin = self.ctx.fused_norm == "plugin" and not lone
            target, note = (fuse_plugin if plugin else fuse_onnx)(graph, ph, spec, self.ctx)
            reason = "; ".join([*spec.refusals, *filter(None, [note])])
            if lone:
                self.ctx.record(spec.labels, "kept", None, reason)
            else:
                self.ctx.record(spec.labels, "fused", target, reason)
        return ir.passes.PassResult(model, bool(phs))

    def ensures(self, model: ir.Model) -> None:
        """No internal placeholder survives."""
        left = [n.name for n in model.graph if n.domain == INTERNAL_DOMAIN]
        if left:
            raise ir.passes.PostconditionError(f"placeholders left in the graph: {left}")
