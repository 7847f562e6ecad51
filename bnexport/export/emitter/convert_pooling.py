"""Pooling: ``Max/AveragePooling{1,2,3}D`` and ``Global{Average,Max}Pooling{1,2,3}D``.

Windows pool in the layer's channels-first layout with the convolutions' padding rule
(:func:`~.convert_conv.padding_attrs`; SAME average pooling divides by the number of
non-padded elements, like TensorFlow: ONNX ``count_include_pad=0``). Global pooling is a
``ReduceMean``/``ReduceMax`` over the spatial axes, wherever they are stored; without
``keepdims`` the result is ``[batch, C]`` in Keras layout.
"""

from __future__ import annotations

from typing import Any

from bnexport.export.emitter.convert_conv import padding_attrs, spatial_perm, spatial_sizes
from bnexport.export.emitter.convert_norm import reduce_mean
from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Tensor, identity


@register("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
          "AveragePooling2D", "AveragePooling3D")  # fmt: skip
def pool(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """Windowed max/average pooling."""
    x = args[0]
    perm = spatial_perm(layer, x.rank)
    kernel = list(layer.pool_size)
    strides = list(layer.strides)
    attrs = {
        "kernel_shape": kernel,
        "strides": strides,
        **padding_attrs(layer.padding, spatial_sizes(x, layer), kernel, strides, [1] * len(kernel)),
    }
    is_max = any(c.__name__.startswith("MaxPooling") for c in type(layer).__mro__)
    if not is_max:
        attrs["count_include_pad"] = 0
    value = ctx.b.op("MaxPool" if is_max else "AveragePool", [ctx.b.in_layout(x, perm)], attrs)
    return ctx.out(value, perm)


def _reduce(
    ctx: EmitContext, x: Tensor, keras_axes: list[int], keepdims: bool, kind: str
) -> Tensor:
    axes = sorted(x.onnx_axis(a) for a in keras_axes)
    if kind == "mean":
        value = reduce_mean(ctx, x.value, axes, keepdims)
    elif ctx.opset >= 18:
        value = ctx.b.op(
            "ReduceMax", [x.value, ctx.b.ints(axes, "axes")], {"keepdims": int(keepdims)}
        )
    else:
        value = ctx.b.op("ReduceMax", [x.value], {"axes": axes, "keepdims": int(keepdims)})
    if keepdims:
        return ctx.out(value, x.perm)
    kept = [k for k in x.perm if k not in keras_axes]  # Keras axes in stored order
    ranks = sorted(kept)
    return ctx.out(value, tuple(ranks.index(k) for k in kept))


@register("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
          "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D")  # fmt: skip
def global_pool(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """Global pooling: a reduction over the spatial axes."""
    x = args[0]
    if kwargs.get("mask") is not None:
        raise ctx.unsupported("global pooling with a mask")
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        spatial = list(range(2, x.rank))
    else:
        spatial = list(range(1, x.rank - 1))
    kind = "max" if "Max" in type(layer).__name__ else "mean"
    if not any(c.__name__.startswith("Global") for c in type(layer).__mro__):
        raise ctx.unsupported("not a global pooling layer")
    return _reduce(ctx, x, spatial, bool(getattr(layer, "keepdims", False)), kind)


@register("Mean", "Max", kind="op")
def reduce_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.mean`` / ``ops.max`` over given axes."""
    x = args[0]
    axis = op.axis
    if axis is None:
        axes = list(range(x.rank))
    else:
        axes = [a % x.rank for a in (axis if isinstance(axis, list | tuple) else [axis])]
    if not axes:
        return ctx.out(ctx.b.op("Identity", [x.value]), x.perm)
    kind = "mean" if type(op).__name__ == "Mean" else "max"
    result = _reduce(ctx, x, axes, bool(op.keepdims), kind)
    if not op.keepdims and result.rank == 0:
        result.perm = identity(0)
    return result
