"""Graph edits shared by the fold rules: constant weights, a MatMul bias, folded weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnexport.export.passes.context import AffineSpec, FoldContext
from bnexport.graph.islands import cast_folded, run_in_float32, storage_dtype
from bnexport.graph.utils import (
    Namer,
    add_initializer,
    append_to,
    const_array,
    single_consumer,
    take_over,
)


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
    append_to(graph, namer, out, add, suffix="nobias")
    return add


def constant_weights(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """``(W, B)`` of a linear op as constants (``B`` is ``None`` when absent), or why not."""
    op, name = node.op_type, node.name
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return f"W of {op} '{name}' is not a constant initializer"
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = const_array(bias_value)
    if bias_value is not None and bias is None:
        return f"bias of {op} '{name}' is not a constant initializer"
    return weight, bias


def gemm_bias(gemm: ir.Node, bias: np.ndarray | None) -> np.ndarray:
    """The ``β·C`` term of ``Y = α·A'·B' + β·C`` in float64 (0 without ``C`` or with β = 0)."""
    beta = gemm.attributes.get_float("beta", 1.0)
    if bias is None or beta == 0:
        return np.float64(0.0)
    return beta * bias.astype(np.float64)


@dataclasses.dataclass
class WeightFold:
    """A checked fold into a linear op: its new float64 weight and bias.

    Attributes:
        node: the Conv/ConvTranspose/Gemm/MatMul that absorbs the normalization.
        weight: the new ``W`` (float64, ``old_weight``'s shape).
        bias: the new ``B`` (Gemm: ``C``; MatMul: the bias to add), float64 ``[N]``.
        old_weight: the current ``W``, to tell a float16 underflow from a zero slice.
        through: a ``Transpose`` between the normalization and ``node`` (backward fold).
    """

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray
    old_weight: np.ndarray
    through: ir.Node | None = None


def write_weight_fold(
    graph: ir.Graph, fold: WeightFold, spec: AffineSpec, ctx: FoldContext, *, rank: int | None
) -> str:
    """Give ``fold.node`` its folded weight and bias; return the node now holding them.

    (A ``MatMul`` may become a ``Gemm``: the returned name is the node's in the end.)

    Both tensors are cast to the graph dtype, or, if one does not fit float16, stored in
    float32 with the op run as a float32 island (the placeholder's ``refusals`` say why).
    A ``MatMul`` gets a bias (see :func:`attach_bias`) only when it is nonzero or the op
    runs in float32 (where the trailing ``Cast`` needs the bias inside the island);
    ``Conv``/``ConvTranspose``/``Gemm`` take it as input 2 (``Gemm``: with ``β = 1``).
    ``rank`` is the rank of the ``MatMul``'s data input, if known.
    """
    node, namer = fold.node, ctx.namer(graph)
    name = node.name or node.op_type
    policy = ctx.float16_policy
    wdtype = node.inputs[1].dtype or spec.dtype
    w = cast_folded(fold.weight, wdtype, what="weight", node=name, policy=policy,
                    reference=fold.old_weight)  # fmt: skip
    b = cast_folded(fold.bias, spec.dtype, what="bias", node=name, policy=policy)
    dtype, why = storage_dtype([w, b], spec.dtype)
    weight = add_initializer(graph, namer, fold.weight.astype(dtype), f"{name}_W")
    node.replace_input_with(1, weight)
    run = [node]
    if node.op_type == "MatMul":
        if fold.bias.any() or why:
            last = attach_bias(graph, namer, node, fold.bias, dtype, rank=rank)
            run = [last] if last.op_type == "Gemm" else [node, last]
    else:
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        bias = add_initializer(graph, namer, fold.bias.astype(dtype), f"{name}_B")
        node.replace_input_with(2, bias)
        if node.op_type == "Gemm":
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    if why:
        run_in_float32(graph, namer, run, spec.dtype)
        spec.refusals.append(f"{run[0].op_type} kept in float32: {why}")
    return run[0].name or name
