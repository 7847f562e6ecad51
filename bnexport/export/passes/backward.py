"""Backward fold: a normalization into the linear op that consumes its output.

With ``x' = x · s + t`` per input channel ``i`` feeding ``y = W ⊛ x' + B``::

    y = Σ_{i,k} W[o,i,k] · (x[i] · s[i] + t[i]) + B[o]
      = Σ_{i,k} (W[o,i,k] · s[i]) · x[i] + (B[o] + Σ_{i,k} W[o,i,k] · t[i])

so ``W'[o,i,…] = W[o,i,…] · s[i]`` and ``B'[o] = B[o] + Σ_{i,k} W[o,i,k] · t[i]``. For a
grouped Conv (``W[M, C/g, k…]``) input channel ``i`` of output ``o`` is
``(o // (M/g))·(C/g) + i``. Gemm ``Y = α·A·B + β·C`` (A ``[M,K]``, or ``[K,M]`` with
``transA``): ``B'[k,n] = B[k,n]·s[k]``, ``C' = β·C + α·(t·B)``, ``β' = 1``. MatMul with a
constant ``W[K,N]``: same, the bias term goes to a bias ``Add`` / ``Gemm`` / new ``Add``.

**Exactness.** The bias identity needs *every* term of the sum to be a normalized input.
A Conv that zero-pads feeds raw zeros at the border, where the unfolded graph would have
fed ``0 · s + t = t`` — the border outputs would change. So a Conv is a target only when
its padding is zero (``pads`` all 0 / ``auto_pad=VALID``, or ``SAME_*`` that works out to
zero), or when ``t`` is all zero. The normalized value must feed only that op (else the
other consumers would lose the normalization) and not be a graph output. One
``Transpose`` in between (``Mul/Add → Transpose → Conv`` in NHWC graphs) is looked
through: the channel axis moves to where ``perm`` puts it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from bnexport.export.fold_math import fold_into_consumer_weights
from bnexport.export.passes.context import AffineSpec, FoldContext, FoldRulePass, spec_of
from bnexport.export.passes.rewrite import (
    WeightFold,
    constant_weights,
    gemm_bias,
    write_weight_fold,
)
from bnexport.graph.utils import (
    single_consumer,
    static_dim,
    transpose_perm,
)

TARGET_OPS = ("Conv", "Gemm", "MatMul")


def conv_padding_is_zero(conv: ir.Node, x: ir.Value, weight: np.ndarray) -> bool:
    """Whether ``conv`` reads no padded element (explicit, VALID, or SAME that needs none)."""
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return True
    if auto_pad == "NOTSET":
        pads = conv.attributes.get_ints("pads")
        return pads is None or all(p == 0 for p in pads)
    spatial = weight.ndim - 2
    kernel = conv.attributes.get_ints("kernel_shape") or weight.shape[2:]
    strides = conv.attributes.get_ints("strides") or (1,) * spatial
    dilations = conv.attributes.get_ints("dilations") or (1,) * spatial
    for d in range(spatial):
        size = static_dim(x, 2 + d)
        if size is None:
            if kernel[d] != 1:
                return False
            continue  # a 1-wide kernel never needs SAME padding
        out = math.ceil(size / strides[d])
        total = max((out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - size, 0)
        if total:
            return False
    return True


def _target(ph: ir.Node, spec: AffineSpec) -> tuple[ir.Value, ir.Node, ir.Node | None, int] | str:
    """``(value it reads, target op, Transpose in between, channel axis there)`` or why not."""
    y = ph.outputs[0]
    if y.is_graph_output():
        return "BN output is a graph output"
    consumer = single_consumer(y)
    if consumer is None:
        return "BN output has another consumer" if y.uses() else "BN output is unused"
    if consumer.op_type == "Transpose" and consumer.domain == "":
        after = single_consumer(consumer.outputs[0])
        if after is not None and after.op_type in TARGET_OPS and after.domain == "":
            perm = transpose_perm(consumer, spec.rank)
            return consumer.outputs[0], after, consumer, perm.index(spec.positive_axis) - spec.rank
    return y, consumer, None, spec.axis


def _conv_fold(
    conv: ir.Node, y: ir.Value, axis: int, params: tuple[np.ndarray, np.ndarray | None],
    spec: AffineSpec,
) -> tuple[np.ndarray, np.ndarray] | str:  # fmt: skip
    """Folded ``(W', B')`` of a Conv reading the normalized ``y``, or why not."""
    (weight, bias), name = params, conv.name
    if axis != 1 - weight.ndim:
        return f"normalized axis is not Conv '{name}''s input channel axis"
    groups = conv.attributes.get_int("group", 1)
    if weight.shape[1] * groups != spec.channels:
        return f"Conv '{name}' has {weight.shape[1] * groups} input channels"
    if spec.shift.any() and not conv_padding_is_zero(conv, y, weight):
        return f"Conv '{name}' has nonzero padding (backward fold inexact)"
    return fold_into_consumer_weights(
        weight, bias, spec.scale, spec.shift, in_axis=1, out_axis=0, groups=groups
    )


def _matrix_fold(
    node: ir.Node, axis: int, params: tuple[np.ndarray, np.ndarray | None], spec: AffineSpec
) -> tuple[np.ndarray, np.ndarray] | str:
    """Folded ``(B', C')`` of a Gemm (``(W', bias)`` of a MatMul) reading it, or why not."""
    (weight, bias), op, name = params, node.op_type, node.name
    if weight.ndim != 2:
        return f"W of {op} '{name}' is not 2-D"
    trans_a = op == "Gemm" and node.attributes.get_int("transA", 0) == 1
    if axis != (-2 if trans_a else -1) or spec.rank < 2:
        return f"normalized axis is not the reduced (K) axis of {op} '{name}'"
    in_axis, out_axis = (1, 0) if op == "Gemm" and node.attributes.get_int("transB", 0) else (0, 1)
    if weight.shape[in_axis] != spec.channels:
        return f"{op} '{name}' has K={weight.shape[in_axis]}, BN {spec.channels} channels"
    w, added = fold_into_consumer_weights(
        weight, None, spec.scale, spec.shift, in_axis=in_axis, out_axis=out_axis
    )
    if op == "MatMul":
        return w, added
    return w, gemm_bias(node, bias) + node.attributes.get_float("alpha", 1.0) * added


def check(ph: ir.Node, spec: AffineSpec) -> WeightFold | str:
    """Check the backward fold of placeholder ``ph``; return a plan or the refusal reason."""
    target = _target(ph, spec)
    if isinstance(target, str):
        return target
    y, node, through, axis = target
    op, name = node.op_type, node.name
    if node.domain != "" or op not in TARGET_OPS:
        return f"BN output feeds {op} '{name}', not Conv/Gemm/MatMul"
    if node.inputs[0] is not y:
        return f"BN output is not the data input of {op} '{name}'"
    params = constant_weights(node)
    if isinstance(params, str):
        return params
    if op == "Conv":
        folded = _conv_fold(node, y, axis, params, spec)
    else:
        folded = _matrix_fold(node, axis, params, spec)
    if isinstance(folded, str):
        return folded
    return WeightFold(node, *folded, old_weight=params[0], through=through)


def rewrite(graph: ir.Graph, ph: ir.Node, plan: WeightFold, ctx: FoldContext) -> str:
    """Apply ``plan``: the consumer reads ``x`` with new weights; return the target name."""
    spec = spec_of(ph)
    (plan.through or plan.node).replace_input_with(0, ph.inputs[0])
    graph.remove(ph, safe=True)
    return write_weight_fold(graph, plan, spec, ctx, rank=spec.rank)


class BackwardFoldPass(FoldRulePass):
    """Fold each remaining placeholder into the Conv/Gemm/MatMul consuming its output.

    The report keeps the forward refusal, which says why the fold went backward.
    """

    direction = "backward"
    action = "folded_backward"
    check = staticmethod(check)
    rewrite = staticmethod(rewrite)
