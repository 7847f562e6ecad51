"""Convolutions and ``Dense``: Keras kernels to ONNX ``Conv``/``ConvTranspose``/``Gemm``/``MatMul``.

Kernel layouts (Keras → ONNX), ``n`` spatial axes:

* ``Conv{n}D`` (``groups`` included): ``[k₁…kₙ, C/g, M]`` → ``[M, C/g, k₁…kₙ]``;
* ``DepthwiseConv{n}D``: ``[k…, C, m]`` → ``[C·m, 1, k…]``, ``group = C`` (Keras's output
  channel ``c·m + j`` is the row-major flattening of ``[C, m]``);
* ``SeparableConv{n}D``: the depthwise conv, then a 1×1 ``Conv`` ``[M, C·m, 1…]``;
* ``Conv{n}DTranspose``: ``[k…, M, C]`` → ``[C, M, k…]`` (``ConvTranspose``; output length
  as Keras computes it, see :func:`_transpose_pads`);
* ``Dense``: ``[K, N]`` as is — ``Gemm`` on rank 2, ``MatMul`` (+ ``Add``) on higher ranks,
  applied to the last Keras axis (the input is brought to Keras layout first); on a
  channels-last image stored channels-first, a 1×1 ``Conv`` ``[N, K, 1…]`` instead (no
  ``Transpose`` either side).

``padding="same"`` follows TensorFlow: ``out = ceil(in / s)``,
``pad = max((out − 1)·s + (k − 1)·d + 1 − in, 0)``, the odd element at the *end*. With a
static spatial size the pads are written out; otherwise ``auto_pad="SAME_UPPER"`` (the
same rule). ``"causal"`` (1-D) pads ``(k − 1)·d`` at the start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnexport.export.emitter.activations import apply_activation
from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Linear, Tensor, channels_first, identity


def numpy_of(variable: Any) -> np.ndarray:
    """A Keras variable's value as a NumPy array (any backend)."""
    from keras import ops

    return np.asarray(ops.convert_to_numpy(variable))


def spatial_perm(layer: Any, rank: int) -> tuple[int, ...]:
    """The layout a spatial layer works in: channels-first (identity for ``channels_first``)."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return identity(rank)
    return channels_first(rank)


def spatial_sizes(x: Tensor, layer: Any) -> list[int | None]:
    """The Keras spatial sizes of ``x`` for ``layer``'s data format."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return list(x.shape[2:])
    return list(x.shape[1:-1])


def same_pads(
    sizes: list[int | None], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int] | None:
    """TensorFlow's SAME pads ``[begins…, ends…]``; ``None`` when a size is unknown."""
    if any(s is None for s in sizes):
        return None
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return begins + ends


def padding_attrs(
    padding: str,
    sizes: list[int | None],
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
) -> dict[str, Any]:
    """``pads`` (or ``auto_pad``) of a Conv/Pool for Keras's ``padding``."""
    n = len(kernel)
    if padding == "valid":
        return {"pads": [0] * (2 * n)}
    if padding == "causal":
        return {"pads": [(kernel[0] - 1) * dilations[0], 0]}
    pads = same_pads(sizes, kernel, strides, dilations)
    if pads is None:
        return {"auto_pad": "SAME_UPPER"}
    return {"pads": pads}


def emit_conv(
    ctx: EmitContext,
    layer: Any,
    x: Tensor,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    strides: list[int],
    dilations: list[int],
    padding: str,
    group: int,
    final: bool = True,
) -> Tensor:
    """One ONNX ``Conv`` in ``layer``'s channels-first layout; activation when ``final``."""
    b = ctx.b
    perm = spatial_perm(layer, x.rank)
    xin = b.in_layout(x, perm)
    kernel = list(weight.shape[2:])
    w = b.const(weight.astype(np.float32), "kernel")
    inputs = [xin, w]
    bvalue = None
    if bias is not None:
        bvalue = b.const(bias.astype(np.float32), "bias")
        inputs.append(bvalue)
    attrs = {
        "kernel_shape": kernel,
        "strides": list(strides),
        "dilations": list(dilations),
        "group": int(group),
        **padding_attrs(padding, spatial_sizes(x, layer), kernel, strides, dilations),
    }
    y = b.op("Conv", inputs, attrs)
    if not final:
        return Tensor(y, perm, (None,) * x.rank)
    linear = Linear(node=y.producer(), weight=w, bias=bvalue, out_axis=0, channel_axis=1)
    activation = getattr(layer, "activation", None)
    out, changed = apply_activation(ctx, y, activation, perm, x.rank)
    return ctx.out(out, perm, linear=None if changed else linear)


def _conv_args(layer: Any) -> dict[str, Any]:
    return {
        "strides": list(layer.strides),
        "dilations": list(layer.dilation_rate),
        "padding": layer.padding,
    }


def _kernel_to_onnx(kernel: np.ndarray) -> np.ndarray:
    """``[k…, C/g, M]`` → ``[M, C/g, k…]``."""
    n = kernel.ndim - 2
    return kernel.transpose((n + 1, n, *range(n)))


def _depthwise_to_onnx(kernel: np.ndarray) -> np.ndarray:
    """``[k…, C, m]`` → ``[C·m, 1, k…]``."""
    n = kernel.ndim - 2
    flat = kernel.reshape((*kernel.shape[:n], -1))
    return np.expand_dims(flat.transpose((n, *range(n))), 1)


@register("Conv1D", "Conv2D", "Conv3D")
def conv(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ConvND`` (grouped too): one ``Conv``."""
    x = args[0]
    bias = numpy_of(layer.bias) if layer.use_bias else None
    return emit_conv(
        ctx, layer, x, _kernel_to_onnx(numpy_of(layer.kernel)), bias,
        group=int(getattr(layer, "groups", 1)), **_conv_args(layer),
    )  # fmt: skip


@register("DepthwiseConv1D", "DepthwiseConv2D")
def depthwise(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``DepthwiseConvND``: one ``Conv`` with ``group = C``."""
    x = args[0]
    kernel = numpy_of(layer.kernel)
    bias = numpy_of(layer.bias) if layer.use_bias else None
    return emit_conv(
        ctx, layer, x, _depthwise_to_onnx(kernel), bias,
        group=int(kernel.shape[-2]), **_conv_args(layer),
    )  # fmt: skip


@register("SeparableConv1D", "SeparableConv2D")
def separable(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``SeparableConvND``: depthwise ``Conv`` then pointwise 1×1 ``Conv`` (bias, activation)."""
    x = args[0]
    depth = numpy_of(layer.depthwise_kernel)
    mid = emit_conv(
        ctx, layer, x, _depthwise_to_onnx(depth), None,
        group=int(depth.shape[-2]), final=False, **_conv_args(layer),
    )  # fmt: skip
    mid = Tensor(mid.value, mid.perm, x.shape, x.dtype)
    bias = numpy_of(layer.bias) if layer.use_bias else None
    n = depth.ndim - 2
    return emit_conv(
        ctx, layer, mid, _kernel_to_onnx(numpy_of(layer.pointwise_kernel)), bias,
        strides=[1] * n, dilations=[1] * n, padding="valid", group=1,
    )  # fmt: skip


def _transpose_pads(
    size: int | None, k: int, s: int, d: int, padding: str, extra: int | None
) -> tuple[int, int, int]:
    """``(pad_begin, pad_end, output_padding)`` of one axis of Keras's transposed conv.

    The full transposed output has ``full = (in − 1)·s + (k − 1)·d + 1`` elements. Keras
    keeps ``in·s + max(k − s, 0)`` (``"valid"``) or ``in·s`` (``"same"``), or with
    ``output_padding`` ``full − 2·pad + output_padding`` (``pad`` = 0, or half the dilated
    kernel for ``"same"``). TensorFlow crops like the gradient of the forward conv:
    ``crop = full − out``, ``crop // 2`` at the start for ``"same"``, the rest at the end;
    a longer output gets ``−crop`` zeros-plus-bias at the end (ONNX ``output_padding``).
    """
    if size is None:
        raise ValueError("spatial size unknown")
    dilated = (k - 1) * d + 1
    full = (size - 1) * s + dilated
    if extra is not None:
        out = full - 2 * (dilated // 2 if padding == "same" else 0) + extra
    elif padding == "valid":
        out = size * s + max(dilated - s, 0)
    else:
        out = size * s
    crop = full - out
    if crop < 0:
        return 0, 0, -crop
    begin = crop // 2 if padding == "same" else 0
    return begin, crop - begin, 0


@register("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
def conv_transpose(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ConvNDTranspose``: one ``ConvTranspose`` (kernel ``[k…, M, C]`` → ``[C, M, k…]``)."""
    b = ctx.b
    x = args[0]
    perm = spatial_perm(layer, x.rank)
    kernel = numpy_of(layer.kernel)
    n = kernel.ndim - 2
    weight = kernel.transpose((n + 1, n, *range(n))).astype(np.float32)
    extras = layer.output_padding or [None] * n
    try:
        pads = [
            _transpose_pads(size, k, s, d, layer.padding, e)
            for size, k, s, d, e in zip(
                spatial_sizes(x, layer), layer.kernel_size, layer.strides,
                layer.dilation_rate, extras, strict=True,
            )
        ]  # fmt: skip
    except ValueError as exc:
        raise ctx.unsupported(f"{type(layer).__name__}: {exc}") from None
    w = b.const(weight, "kernel")
    bvalue = b.const(numpy_of(layer.bias).astype(np.float32), "bias") if layer.use_bias else None
    attrs = {
        "kernel_shape": list(layer.kernel_size),
        "strides": list(layer.strides),
        "dilations": list(layer.dilation_rate),
        "pads": [p[0] for p in pads] + [p[1] for p in pads],
        "output_padding": [p[2] for p in pads],
    }
    inputs = [b.in_layout(x, perm), w, *([bvalue] if bvalue is not None else [])]
    y = b.op("ConvTranspose", inputs, attrs)
    out, _ = apply_activation(ctx, y, layer.activation, perm, x.rank)
    return ctx.out(out, perm)


class _Pointwise:
    """A ``Dense`` seen as a channels-last 1×1 convolution (for :func:`emit_conv`)."""

    data_format = "channels_last"

    def __init__(self, activation: Any) -> None:
        self.activation = activation


@register("Dense")
def dense(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Dense``: ``Gemm`` (rank 2) or ``MatMul`` + ``Add`` over the last Keras axis."""
    b = ctx.b
    x = args[0]
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise ctx.unsupported("Dense with LoRA or quantized kernel")
    if x.rank >= 3 and x.perm == channels_first(x.rank):
        # features stored on axis 1 (an NHWC tensor kept NCHW): a 1×1 Conv, no Transposes
        kernel_t = numpy_of(layer.kernel).T  # [N, K]
        kernel = kernel_t.reshape((*kernel_t.shape, *([1] * (x.rank - 2))))
        bias = numpy_of(layer.bias) if layer.use_bias else None
        n = x.rank - 2
        pointwise = _Pointwise(layer.activation)
        return emit_conv(ctx, pointwise, x, kernel, bias, strides=[1] * n,
                         dilations=[1] * n, padding="valid", group=1)  # fmt: skip
    xin = b.keras_layout(x)
    w = b.const(numpy_of(layer.kernel).astype(np.float32), "kernel")
    bvalue = b.const(numpy_of(layer.bias).astype(np.float32), "bias") if layer.use_bias else None
    rank = x.rank
    if rank == 2:
        y = b.op("Gemm", [xin, w, *([bvalue] if bvalue is not None else [])])
        linear = Linear(node=y.producer(), weight=w, bias=bvalue, out_axis=1, channel_axis=1)
    else:
        y = b.op("MatMul", [xin, w])
        node = y.producer()
        add = None
        if bvalue is not None:
            y = b.op("Add", [y, bvalue])
            add = y.producer()
        linear = Linear(
            node=node, weight=w, bias=bvalue, out_axis=1, channel_axis=rank - 1, bias_node=add
        )
    perm = identity(rank)
    out, changed = apply_activation(ctx, y, layer.activation, perm, rank)
    return ctx.out(out, perm, linear=None if changed else linear)
