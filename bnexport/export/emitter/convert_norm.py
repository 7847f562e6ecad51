"""Normalization: batch normalization folded as it is emitted; ``LayerNormalization``.

Batch normalization (every kind :func:`bnexport.layers.walk.is_batch_norm` recognizes:
Keras's, bnexport's, SyncBN, inference form, FusedNorm) is the per-channel affine map
``y = x·scale + shift`` (``scale = γ/√(var+ε)``, ``shift = β − μ·scale``, float64, from
:func:`bnexport.export.bn_layers.bn_from_layer`). When its input comes straight from a
Conv/Gemm/MatMul this emitter wrote, on the BN's channel axis, and the BN is that
output's only consumer in the Keras graph, it is folded into the weights right away with
:func:`bnexport.export.fold_math.fold_into_producer_weights` (``W' = W·scale``,
``B' = B·scale + shift``) and recorded ``folded_forward``. Otherwise it is written as a
``Mul``/``Add`` pair on its channel axis, named after the layer, and the fold passes
(:mod:`bnexport.export.passes`) decide: fold forward/backward, or fuse into one node
(``BatchNormalization`` or ``bnexport::FusedNorm``) — the form today's path produces.

``LayerNormalization``: ``(x − mean)/√(var + ε)·γ + β`` over its axes (biased variance,
like Keras), or ``x/√(var + ε)·γ`` with Keras's (deprecated) ``rms_scaling``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from bnexport.export.bn_layers import bn_from_layer
from bnexport.export.emitter.convert_conv import numpy_of
from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Linear, Tensor, channels_first, identity
from bnexport.export.fold_math import fold_into_producer_weights
from bnexport.export.report import FoldRecord


def _fold(ctx: EmitContext, x: Tensor, scale: np.ndarray, shift: np.ndarray) -> ir.Value:
    """Fold ``scale``/``shift`` into ``x.linear``; the value now carrying the BN's output."""
    lin: Linear = x.linear  # type: ignore[assignment]
    weight = lin.weight.const_value.numpy()
    bias = lin.bias.const_value.numpy() if lin.bias is not None else None
    w2, b2 = fold_into_producer_weights(weight, bias, scale, shift, out_axis=lin.out_axis)
    dtype = weight.dtype
    lin.weight.const_value = ir.tensor(w2.astype(dtype), name=lin.weight.name)
    if lin.bias is not None:
        lin.bias.const_value = ir.tensor(b2.astype(dtype), name=lin.bias.name)
        return x.value
    prev_layer = ctx.b.layer
    ctx.b.layer = lin.node.name.rsplit("/", 1)[0]
    bias_value = ctx.b.const(b2.astype(dtype), "bias")
    ctx.b.layer = prev_layer
    lin.bias = bias_value
    if lin.node.op_type in ("Conv", "Gemm"):
        lin.node.resize_inputs(3)
        lin.node.replace_input_with(2, bias_value)
        return x.value
    added = ctx.b.op("Add", [x.value, bias_value])  # MatMul without bias
    lin.bias_node = added.producer()
    return added


@register("BatchNormalization")
def batch_norm(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """Any batch normalization, in inference form (see module doc)."""
    x = args[0]
    bn = ctx.bns.get(id(layer)) or bn_from_layer(layer, ctx.name)
    axes = sorted({a % x.rank for a in bn.axes})
    if len(axes) != 1:
        raise ctx.unsupported(f"batch normalization over several axes {bn.axes}")
    axis = x.onnx_axis(axes[0])
    scale, shift = bn.scale.reshape(-1), bn.shift.reshape(-1)
    lin = x.linear
    if lin is not None and x.consumers == 1 and lin.channel_axis == axis:
        value = _fold(ctx, x, scale, shift)
        ctx.records.append(FoldRecord(bn.name, "folded_forward", lin.node.name, ""))
        for key, (held, _) in list(ctx.layer_values.items()):
            if held is x.value:  # the producer's own output no longer exists
                del ctx.layer_values[key]
        return ctx.out(value, x.perm, linear=lin)
    b = ctx.b
    value, perm = x.value, x.perm
    if x.rank >= 3 and axes[0] == x.rank - 1 and perm == identity(x.rank):
        # an NHWC tensor still in Keras layout (a graph input): normalize it channels-first,
        # where the convolution after it works, so no Transpose separates the two
        perm = channels_first(x.rank)
        value = b.in_layout(x, perm)
        axis = 1
    s = b.channel_const(scale.astype(np.float32), axis, x.rank, "scale")
    t = b.channel_const(shift.astype(np.float32), axis, x.rank, "shift")
    mul = b.op("Mul", [value, s])
    add = b.op("Add", [mul, t])
    ctx.bn_nodes[mul.producer().name] = bn.name
    ctx.bn_nodes[add.producer().name] = bn.name
    return ctx.out(add, perm)


def reduce_mean(ctx: EmitContext, x: ir.Value, axes: list[int], keepdims: bool) -> ir.Value:
    """``ReduceMean`` over ``axes`` (attribute before opset 18, input from 18)."""
    if ctx.opset >= 18:
        return ctx.b.op("ReduceMean", [x, ctx.b.ints(axes, "axes")], {"keepdims": int(keepdims)})  # type: ignore[return-value]
    return ctx.b.op("ReduceMean", [x], {"axes": axes, "keepdims": int(keepdims)})  # type: ignore[return-value]


@register("LayerNormalization")
def layer_norm(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``LayerNormalization`` decomposed (see module doc), in the input's layout."""
    b = ctx.b
    x = args[0]
    axes_k = [
        a % x.rank for a in (layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis])
    ]
    axes = sorted(x.onnx_axis(a) for a in axes_k)
    eps = b.const(np.asarray(layer.epsilon, np.float32), "epsilon")
    mean = reduce_mean(ctx, x.value, axes, True)
    d = b.op("Sub", [x.value, mean])
    var = reduce_mean(ctx, b.op("Mul", [d, d]), axes, True)
    # rms_scaling (deprecated in Keras) divides x itself, not x − mean, by √(var + ε)
    numerator = x.value if getattr(layer, "rms_scaling", False) else d
    y = b.op("Div", [numerator, b.op("Sqrt", [b.op("Add", [var, eps])])])

    def param(variable: Any) -> np.ndarray:
        # Keras keeps gamma/beta with the normalized axes' sizes: expand to full rank
        value = numpy_of(variable).astype(np.float32).reshape(-1)
        shape = [1] * x.rank
        sizes = iter(numpy_of(variable).shape if len(axes_k) > 1 else [value.size])
        for a in axes_k:
            shape[a] = next(sizes)
        return value.reshape(shape)

    if layer.scale and layer.gamma is not None:
        gamma = b.broadcast_const(param(layer.gamma), x.perm, x.rank, "gamma")
        y = b.op("Mul", [y, gamma])
    if layer.center and layer.beta is not None and not getattr(layer, "rms_scaling", False):
        y = b.op("Add", [y, b.broadcast_const(param(layer.beta), x.perm, x.rank, "beta")])
    return ctx.out(y, x.perm)
