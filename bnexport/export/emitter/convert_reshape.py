"""Shape and layout: reshapes, padding, cropping, upsampling, and their ``keras.ops``.

Layers ``Reshape``, ``Flatten``, ``Permute``, ``ZeroPadding*``, ``Cropping*``,
``UpSampling*``; ``keras.ops`` nodes ``reshape``, ``transpose``, ``pad``, ``split``,
``expand_dims``, ``squeeze``, ``matmul``.

Reshapes and flattening depend on the element order, so their input is brought to Keras
layout first (``Flatten`` of an NHWC tensor stored NCHW would otherwise order features
channel-major). ``Flatten(data_format="channels_first")`` moves channels last first, as
Keras does. Padding and cropping work in whatever layout the input is stored in: each
Keras axis's pads land on the ONNX axis holding it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnexport.export.emitter.convert_conv import spatial_perm
from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Tensor, identity

_INT64_MAX = np.iinfo(np.int64).max


def _reshape(ctx: EmitContext, x: Tensor, shape: list[int]) -> Tensor:
    """Reshape ``x`` (in Keras layout) to ``shape`` (``0`` copies, ``-1`` infers)."""
    value = ctx.b.op("Reshape", [ctx.b.keras_layout(x), ctx.b.ints(shape, "shape")])
    return ctx.out(value, identity(len(shape)))


@register("Reshape")
def reshape_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Reshape(target_shape)``: batch kept (``0``), the rest as given."""
    return _reshape(ctx, args[0], [0, *[int(d) for d in layer.target_shape]])


@register("Flatten")
def flatten_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Flatten``: ``[batch, prod(rest)]`` in Keras's (channels-last) element order."""
    x = args[0]
    perm = identity(x.rank)
    if getattr(layer, "data_format", "channels_last") == "channels_first" and x.rank > 2:
        perm = (0, *range(2, x.rank), 1)
    value = ctx.b.op("Flatten", [ctx.b.in_layout(x, perm)], {"axis": 1})
    return ctx.out(value, identity(2))


@register("Permute")
def permute_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Permute(dims)``: no node — only the stored layout's meaning changes."""
    x = args[0]
    dims = (0, *[int(d) for d in layer.dims])  # keras_out = keras_in.transpose(dims)
    # value = in.T(p) = out.T(q) with out = in.T(dims): q[i] = dims.index(p[i])
    return ctx.out(x.value, tuple(dims.index(p) for p in x.perm))


def _pad(ctx: EmitContext, x: Tensor, keras_pads: dict[int, tuple[int, int]], value: float = 0.0):
    begins, ends = [0] * x.rank, [0] * x.rank
    for axis, (before, after) in keras_pads.items():
        begins[x.onnx_axis(axis)] = int(before)
        ends[x.onnx_axis(axis)] = int(after)
    inputs = [x.value, ctx.b.ints(begins + ends, "pads")]
    if value:
        inputs.append(ctx.b.const(np.asarray(value, np.dtype(x.dtype)), "value"))
    return ctx.out(ctx.b.op("Pad", inputs, {"mode": "constant"}), x.perm)


def _spatial_axes(layer: Any, rank: int) -> list[int]:
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return list(range(2, rank))
    return list(range(1, rank - 1))


def _pairs(spec: Any, n: int) -> list[tuple[int, int]]:
    if isinstance(spec, int):
        return [(spec, spec)] * n
    out = []
    for item in spec:
        out.append((item, item) if isinstance(item, int) else (int(item[0]), int(item[1])))
    return out


@register("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D")
def zero_padding(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ZeroPaddingND``: a constant ``Pad`` on the spatial axes.

    A padding read only by a ``Conv`` (``ZeroPadding2D`` → ``Conv2D(padding="valid")``)
    ends up in that Conv's ``pads``: the fold pipeline merges it
    (:mod:`bnexport.export.passes.merge_pad`), so it is written plainly here.
    """
    x = args[0]
    axes = _spatial_axes(layer, x.rank)
    spec = layer.padding
    if len(axes) == 1 and len(spec) == 2 and isinstance(spec[0], int):  # 1D: (left, right)
        pairs = [(int(spec[0]), int(spec[1]))]
    else:
        pairs = _pairs(spec, len(axes))
    return _pad(ctx, x, dict(zip(axes, pairs, strict=True)))


@register("Cropping1D", "Cropping2D", "Cropping3D")
def cropping(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``CroppingND``: a ``Slice`` on the spatial axes."""
    x = args[0]
    axes = _spatial_axes(layer, x.rank)
    spec = layer.cropping
    if len(axes) == 1 and len(spec) == 2 and isinstance(spec[0], int):
        pairs = [(int(spec[0]), int(spec[1]))]
    else:
        pairs = _pairs(spec, len(axes))
    starts, ends, onnx_axes = [], [], []
    for axis, (before, after) in zip(axes, pairs, strict=True):
        starts.append(before)
        ends.append(-after if after else _INT64_MAX)
        onnx_axes.append(x.onnx_axis(axis))
    b = ctx.b
    value = b.op(
        "Slice",
        [x.value, b.ints(starts, "starts"), b.ints(ends, "ends"), b.ints(onnx_axes, "axes")],
    )
    return ctx.out(value, x.perm)


@register("UpSampling1D", "UpSampling2D", "UpSampling3D")
def upsampling(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``UpSamplingND``: ``Resize`` (nearest: asymmetric/floor; bilinear: half-pixel)."""
    x = args[0]
    b = ctx.b
    if type(layer).__name__ == "UpSampling1D" or not hasattr(layer, "data_format"):
        sizes = [int(layer.size)] if isinstance(layer.size, int) else list(layer.size)
        perm = x.perm
        spatial = [1]
    else:
        perm = spatial_perm(layer, x.rank)
        sizes = list(layer.size)
        spatial = _spatial_axes(layer, x.rank)
    mode = getattr(layer, "interpolation", "nearest")
    if mode not in ("nearest", "bilinear"):
        raise ctx.unsupported(f"UpSampling with interpolation={mode!r}")
    xin = b.in_layout(x, perm)
    tmp = Tensor(xin, tuple(perm), x.shape)
    scales = [1.0] * x.rank
    for axis, size in zip(spatial, sizes, strict=True):
        scales[tmp.onnx_axis(axis)] = float(size)
    attrs = (
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
        if mode == "nearest"
        else {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    )
    value = b.op("Resize", [xin, None, b.const(np.asarray(scales, np.float32), "scales")], attrs)
    return ctx.out(value, tuple(perm))


# -- keras.ops ---------------------------------------------------------------------------
@register("Reshape", kind="op")
def reshape_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.reshape(x, newshape)``: a ``None`` (the batch) becomes ``0`` when first."""
    shape = [int(d) if d is not None else (0 if i == 0 else -1) for i, d in enumerate(op.newshape)]
    return _reshape(ctx, args[0], shape)


@register("Transpose", kind="op")
def transpose_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.transpose(x, axes)``: no node, only the stored layout's meaning changes."""
    x = args[0]
    axes = tuple(op.axes) if op.axes is not None else tuple(reversed(range(x.rank)))
    axes = tuple(a % x.rank for a in axes)
    return ctx.out(x.value, tuple(axes.index(p) for p in x.perm))


@register("Pad", kind="op")
def pad_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.pad(x, pad_width)`` (constant mode)."""
    x = args[0]
    if op.mode != "constant":
        raise ctx.unsupported(f"pad with mode={op.mode!r}")
    value = args[1] if len(args) > 1 else kwargs.get("constant_values")
    value = 0.0 if value is None else float(value)
    pads = {axis: (int(p[0]), int(p[1])) for axis, p in enumerate(op.pad_width)}
    return _pad(ctx, x, pads, value)


@register("Split", kind="op")
def split_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """``ops.split(x, indices_or_sections, axis)``."""
    x = args[0]
    axis = int(op.axis) % x.rank
    size = x.shape[axis]
    spec = op.indices_or_sections
    if isinstance(spec, int):
        if size is None:
            raise ctx.unsupported("split of an axis of unknown size")
        parts = [size // spec] * spec
    else:
        if size is None:
            raise ctx.unsupported("split of an axis of unknown size")
        bounds = [0, *[int(i) for i in spec], size]
        parts = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    values = ctx.b.op(
        "Split",
        [x.value, ctx.b.ints(parts, "split")],
        {"axis": x.onnx_axis(axis)},
        num_outputs=len(parts),
    )
    values = values if isinstance(values, list) else [values]
    return [ctx.out(v, x.perm, index=i) for i, v in enumerate(values)]


@register("ExpandDims", kind="op")
def expand_dims_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.expand_dims(x, axis)`` in Keras layout."""
    x = args[0]
    axes = op.axis if isinstance(op.axis, list | tuple) else [op.axis]
    rank = x.rank + len(axes)
    axes = sorted(int(a) % rank for a in axes)
    value = ctx.b.op("Unsqueeze", [ctx.b.keras_layout(x), ctx.b.ints(axes, "axes")])
    return ctx.out(value, identity(rank))


@register("Squeeze", kind="op")
def squeeze_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.squeeze(x, axis)`` in Keras layout."""
    x = args[0]
    if op.axis is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    else:
        axes = [
            int(a) % x.rank for a in (op.axis if isinstance(op.axis, list | tuple) else [op.axis])
        ]
    value = ctx.b.op("Squeeze", [ctx.b.keras_layout(x), ctx.b.ints(axes, "axes")])
    return ctx.out(value, identity(x.rank - len(axes)))


@register("Matmul", kind="op")
def matmul_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.matmul(a, b)`` in Keras layout (constants as initializers)."""
    from bnexport.export.emitter.convert_merge import constant_array

    values = [
        ctx.b.keras_layout(o)
        if isinstance(o, Tensor)
        else ctx.b.const(constant_array(ctx, o).astype(np.float32), "matmul_const")
        for o in (args[0], args[1])
    ]
    rank = len(ctx.out_specs[0].shape)
    return ctx.out(ctx.b.op("MatMul", values), identity(rank))
