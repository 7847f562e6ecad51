"""Graph edits shared by the fold rules: bypass a placeholder, float32 islands, MatMul bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnexport.export.passes.graph_utils import (
    Namer,
    add_initializer,
    const_array,
    single_consumer,
)


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


def cast_node(value: ir.Value, to: ir.DataType, namer: Namer, base: str) -> ir.Node:
    """A ``Cast(value, to)`` node (not inserted) with a typed output."""
    node = ir.node("Cast", [value], {"to": to}, name=namer.fresh(base))
    node.outputs[0].name = namer.fresh(f"{value.name}_{to.name.lower()}")
    node.outputs[0].type = ir.TensorType(to)
    node.outputs[0].shape = value.shape
    return node


def run_in_float32(
    graph: ir.Graph, namer: Namer, first: ir.Node, last: ir.Node, dtype: ir.DataType
) -> None:
    """Run the nodes ``first``…``last`` in float32: Cast input 0 in, Cast the output back.

    Their float16 weights must already have been replaced by float32 ones; ``last``'s
    output keeps its consumers and name through the trailing ``Cast``.
    """
    first.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)  # first…last: at most 2 nodes
    cast_in = cast_node(first.inputs[0], ir.DataType.FLOAT, namer, f"{first.name}_cast_in")
    graph.insert_before(first, cast_in)
    first.replace_input_with(0, cast_in.outputs[0])
    out = last.outputs[0]
    name, shape = out.name, out.shape
    cast_out = ir.node("Cast", [out], {"to": dtype}, name=namer.fresh(f"{last.name}_cast_out"))
    graph.insert_after(last, cast_out)
    back = cast_out.outputs[0]
    for use in list(out.uses()):
        if use.node is not cast_out:
            use.node.replace_input_with(use.idx, back)
    if out.is_graph_output():
        outputs = graph.outputs
        outputs[list(outputs).index(out)] = back
    out.name = namer.fresh(f"{name}_float32")
    out.type = ir.TensorType(ir.DataType.FLOAT)
    back.name, back.type, back.shape = name, ir.TensorType(dtype), shape


def attach_bias(
    graph: ir.Graph,
    namer: Namer,
    matmul: ir.Node,
    bias64: np.ndarray,
    dtype: np.dtype,
    *,
    rank: int | None,
) -> ir.Node:
    """Add a ``[N]`` bias to a ``MatMul`` output; return the node that now ends the op.

    In order of preference: fold it into an existing single-consumer ``Add`` of a constant
    ``[N]``/``[1,…,N]`` bias; turn a rank-2 ``MatMul`` into ``Gemm(A, W, bias)``; else
    append a new ``Add``. ``bias64`` is float64 ``[N]``, range-checked for ``dtype``.
    """
    out = matmul.outputs[0]
    consumer = single_consumer(out)
    if consumer is not None and consumer.op_type == "Add" and consumer.domain == "":
        other = consumer.inputs[1] if consumer.inputs[0] is out else consumer.inputs[0]
        existing = const_array(other)
        if existing is not None and existing.size == bias64.size and existing.ndim >= 1:
            if existing.shape[-1] == bias64.size and existing.dtype == dtype:
                merged = (existing.reshape(-1).astype(np.float64) + bias64).astype(dtype)
                value = add_initializer(graph, namer, merged.reshape(existing.shape), "bias")
                index = 1 if consumer.inputs[0] is out else 0
                consumer.replace_input_with(index, value)
                return consumer
    bias_value = add_initializer(
        graph, namer, bias64.astype(dtype), f"{matmul.name or 'matmul'}_bias"
    )
    if rank == 2:
        gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], bias_value], name=matmul.name)
        graph.insert_before(matmul, gemm)
        gemm.outputs[0].type = out.type
        take_over(graph, out, gemm.outputs[0])
        return gemm
    add = ir.node("Add", [out, bias_value], name=namer.fresh(f"{matmul.name}_bias_add"))
    graph.insert_after(matmul, add)
    new = add.outputs[0]
    new.type = out.type
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, new)
    if out.is_graph_output():
        outputs = graph.outputs
        outputs[list(outputs).index(out)] = new
    name = out.name
    out.name = namer.fresh(f"{name}_nobias")
    new.name, new.shape = name, out.shape
    return add
