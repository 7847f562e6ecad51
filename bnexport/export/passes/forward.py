"""Forward fold: a normalization into the linear op that produces its input.

With ``z = W ⊛ x + B`` (Conv, ConvTranspose, Gemm, MatMul) and ``y = z · s + t`` per
output channel ``o``::

    y = (W · s[o]) ⊛ x + (B · s + t)        W'[o] = W[o] · s[o],   B' = B · s + t

which is exact for every padding, stride, dilation and group count, because the
normalization acts on the output. Layouts: Conv ``W[M, C/g, k…]`` (output axis 0);
ConvTranspose ``W[C, M/g, k…]`` — output channel ``o = (i // (C/g))·(M/g) + j`` for
``W[i, j]``; Gemm ``Y = α·A'·B' + β·C``: scale ``B`` along ``N`` (axis 1, or 0 when
``transB=1``) and set ``C' = β·C·s + t`` with ``β' = 1`` (``α`` stays); MatMul with a
constant 2-D right operand ``W[K, N]``: scale axis 1 and add ``t`` as a bias (an existing
bias ``Add``, a ``Gemm`` for rank-2 inputs, or a new ``Add``).

A ``Transpose`` between the op and the normalization (``Conv → Transpose → Mul/Add``, as
NHWC exporters write) is looked through: the channel axis maps back through ``perm``.

Refused when: ``z`` has another consumer or is a graph output; the weight (or bias / C)
is not a constant initializer; the normalized axis is not the op's output channel axis;
under ``keep_float16_overflow="error"``, a folded float16 weight does not fit float16.
"""

from __future__ import annotations

import onnx_ir as ir

from bnexport.export.fold_math import fold_into_producer_weights
from bnexport.export.passes.context import AffineSpec, FoldContext, FoldRulePass, spec_of
from bnexport.export.passes.rewrite import (
    WeightFold,
    constant_weights,
    gemm_bias,
    write_weight_fold,
)
from bnexport.graph.utils import (
    const_array,
    rank_of,
    single_consumer,
    take_over,
    transpose_perm,
)

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _axis_error(op: ir.Node, axis: int, expected: int) -> str | None:
    if axis != expected:
        return f"normalized axis is not {op.op_type} '{op.name}''s output channel axis"
    return None


def _look_through_transpose(
    x: ir.Value, ph: ir.Node, spec: AffineSpec
) -> tuple[ir.Value, ir.Node | None, int]:
    """See through ``linear → Transpose → BN`` (e.g. NHWC BN after an NCHW Conv).

    Returns the value to fold at, its producer and the channel axis (negative) there.
    """
    producer = x.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain != "":
        return x, producer, spec.axis
    inner = producer.inputs[0]
    inner_producer = inner.producer() if inner is not None else None
    if (
        inner_producer is None
        or inner_producer.op_type not in LINEAR_OPS
        or single_consumer(x) is not ph
        or single_consumer(inner) is not producer
    ):
        return x, producer, spec.axis
    perm = transpose_perm(producer, spec.rank)
    return inner, inner_producer, perm[spec.positive_axis] - spec.rank


def check(ph: ir.Node, spec: AffineSpec) -> WeightFold | str:
    """Check the forward fold of placeholder ``ph``; return a plan or the refusal reason."""
    x, producer, axis = _look_through_transpose(ph.inputs[0], ph, spec)
    if producer is None:
        return "BN input is a graph input or initializer (nothing to fold forward into)"
    op = producer.op_type
    if producer.domain != "" or op not in LINEAR_OPS:
        return f"BN input comes from {op} '{producer.name}', not Conv/ConvTranspose/Gemm/MatMul"
    if x.is_graph_output() or len(x.uses()) != 1:
        return f"{op} '{producer.name}' output has another consumer"
    inputs = producer.inputs
    if op == "MatMul" and const_array(inputs[0]) is not None:
        return "MatMul's constant operand is on the left"
    params = constant_weights(producer)
    if isinstance(params, str):
        return params
    weight, bias = params
    if op in ("Conv", "ConvTranspose"):
        if (err := _axis_error(producer, axis, 1 - weight.ndim)) is not None:
            return err
        groups = producer.attributes.get_int("group", 1)
        out_axis = 0 if op == "Conv" else 1
        channels = weight.shape[out_axis] * (groups if op == "ConvTranspose" else 1)
        if channels != spec.channels:
            return f"{op} '{producer.name}' has {channels} output channels, BN {spec.channels}"
        w, b = fold_into_producer_weights(
            weight, bias, spec.scale, spec.shift, out_axis=out_axis, groups=groups,
            in_axis=0 if op == "ConvTranspose" else None,
        )  # fmt: skip
        return WeightFold(producer, w, b, weight)
    if weight.ndim != 2:
        return f"W of {op} '{producer.name}' is not 2-D"
    if (err := _axis_error(producer, axis, -1)) is not None:
        return err
    out_axis = 0 if op == "Gemm" and producer.attributes.get_int("transB", 0) else 1
    if weight.shape[out_axis] != spec.channels:
        return f"{op} '{producer.name}' has {weight.shape[out_axis]} outputs, BN {spec.channels}"
    w, _ = fold_into_producer_weights(weight, None, spec.scale, spec.shift, out_axis=out_axis)
    if op == "MatMul":
        return WeightFold(producer, w, spec.shift.copy(), weight)
    return WeightFold(producer, w, gemm_bias(producer, bias) * spec.scale + spec.shift, weight)


def rewrite(graph: ir.Graph, ph: ir.Node, plan: WeightFold, ctx: FoldContext) -> str:
    """Apply ``plan``: new weights and bias, placeholder bypassed; return the target name."""
    target = write_weight_fold(graph, plan, spec_of(ph), ctx, rank=rank_of(plan.node.inputs[0]))
    take_over(graph, ph.outputs[0], ph.inputs[0])
    return target


class ForwardFoldPass(FoldRulePass):
    """Fold each placeholder into the Conv/ConvTranspose/Gemm/MatMul producing its input."""

    direction = "forward"
    action = "folded_forward"
    check = staticmethod(check)
    rewrite = staticmethod(rewrite)

    def reason(self, spec: AffineSpec) -> str:
        """Only the float32-island notes: earlier refusals do not concern a forward fold."""
        return "; ".join(r for r in spec.refusals if "float32" in r)
