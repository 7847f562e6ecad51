"""Activations: Keras activation functions, activation layers and ``keras.ops``, as ONNX ops.

Layers ``Activation``, ``ReLU``, ``LeakyReLU``, ``ELU``, ``Softmax``; the ``keras.ops``
nodes of the same functions; the ``activation=`` of Conv/Dense layers.

Keras definitions and their ONNX form:

* ``relu6 = min(max(x, 0), 6)`` → ``Clip(0, 6)``; ``ReLU(max_value, negative_slope)`` the
  same way (``LeakyRelu`` then ``Clip`` above);
* ``hard_sigmoid = relu6(x + 3) / 6`` → ``HardSigmoid(α=1/6, β=1/2)``;
* ``hard_silu = x · hard_sigmoid(x)`` → ``HardSwish`` (opset ≥ 14; ``Mul`` below);
* ``silu = x · sigmoid(x)`` → ``Sigmoid`` + ``Mul``;
* ``gelu`` exact ``x·(1 + erf(x/√2))/2``; approximate with ``tanh``;
* ``softmax`` over the last Keras axis → ``Softmax`` on that axis in the stored layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Tensor

Emit = Callable[[EmitContext, ir.Value, tuple[int, ...], int], ir.Value]


def _scalar(ctx: EmitContext, value: float, base: str = "c") -> ir.Value:
    return ctx.b.const(np.asarray(value, np.float32), base)


def _clip(ctx: EmitContext, x: ir.Value, low: float | None, high: float | None) -> ir.Value:
    inputs = [x, _scalar(ctx, low, "min") if low is not None else None]
    if high is not None:
        inputs.append(_scalar(ctx, high, "max"))
    return ctx.b.op("Clip", inputs)  # type: ignore[return-value]


def _silu(ctx: EmitContext, x: ir.Value) -> ir.Value:
    return ctx.b.op("Mul", [x, ctx.b.op("Sigmoid", [x])])  # type: ignore[return-value]


def _hard_silu(ctx: EmitContext, x: ir.Value) -> ir.Value:
    if ctx.opset >= 14:
        return ctx.b.op("HardSwish", [x])  # type: ignore[return-value]
    hs = ctx.b.op("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5})
    return ctx.b.op("Mul", [x, hs])  # type: ignore[return-value]


def _gelu(ctx: EmitContext, x: ir.Value, approximate: bool) -> ir.Value:
    b = ctx.b
    if approximate:  # x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))
        cube = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Add", [x, b.op("Mul", [cube, _scalar(ctx, 0.044715)])])
        t = b.op("Tanh", [b.op("Mul", [inner, _scalar(ctx, math.sqrt(2 / math.pi))])])
    else:  # x/2 · (1 + erf(x/√2))
        t = b.op("Erf", [b.op("Mul", [x, _scalar(ctx, 1 / math.sqrt(2))])])
    half = b.op("Mul", [x, _scalar(ctx, 0.5)])
    return b.op("Mul", [half, b.op("Add", [t, _scalar(ctx, 1.0)])])  # type: ignore[return-value]


def _softmax(ctx: EmitContext, x: ir.Value, perm: tuple[int, ...], axis: int, log: bool = False):
    rank = len(perm)
    return ctx.b.op("LogSoftmax" if log else "Softmax", [x], {"axis": perm.index(axis % rank)})


def activation_value(
    ctx: EmitContext, x: ir.Value, name: str, perm: tuple[int, ...], **options: Any
) -> ir.Value:
    """Emit Keras activation ``name`` on ``x`` (stored in layout ``perm``)."""
    b = ctx.b
    simple = {
        "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus",
        "softsign": "Softsign", "exponential": "Exp", "selu": "Selu",
    }  # fmt: skip
    if name in simple:
        return b.op(simple[name], [x])  # type: ignore[return-value]
    if name == "relu6":
        return _clip(ctx, x, 0.0, 6.0)
    if name in ("silu", "swish"):
        return _silu(ctx, x)
    if name in ("hard_silu", "hard_swish"):
        return _hard_silu(ctx, x)
    if name == "hard_sigmoid":
        return b.op("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5})  # type: ignore[return-value]
    if name == "elu":
        return b.op("Elu", [x], {"alpha": float(options.get("alpha", 1.0))})  # type: ignore[return-value]
    if name == "leaky_relu":
        slope = float(options.get("negative_slope", 0.2))
        return b.op("LeakyRelu", [x], {"alpha": slope})  # type: ignore[return-value]
    if name == "gelu":
        return _gelu(ctx, x, bool(options.get("approximate", False)))
    if name in ("softmax", "log_softmax"):
        return _softmax(ctx, x, perm, int(options.get("axis", -1)), log=name == "log_softmax")
    raise ctx.unsupported(f"activation {name!r} has no converter")


def activation_name(fn: Any) -> str:
    """The Keras name of activation function ``fn`` (``None`` → ``"linear"``)."""
    if fn is None:
        return "linear"
    if isinstance(fn, str):
        return fn
    return str(getattr(fn, "__name__", type(fn).__name__))


def apply_activation(
    ctx: EmitContext, x: ir.Value, fn: Any, perm: tuple[int, ...], rank: int
) -> tuple[ir.Value, bool]:
    """``(value, changed)`` of activation function ``fn`` applied to ``x``."""
    name = activation_name(fn)
    if name == "linear":
        return x, False
    return activation_value(ctx, x, name, perm), True


@register("Activation")
def activation_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Activation``: the function's ONNX form, in the input's layout."""
    x = args[0]
    out, _ = apply_activation(ctx, x.value, layer.activation, x.perm, x.rank)
    return ctx.out(out, x.perm)


@register("ReLU")
def relu_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ReLU(max_value, negative_slope, threshold)``."""
    x = args[0]
    if float(layer.threshold or 0.0) != 0.0:
        raise ctx.unsupported("ReLU with threshold != 0")
    slope = float(layer.negative_slope or 0.0)
    value = x.value
    if slope:
        value = ctx.b.op("LeakyRelu", [value], {"alpha": slope})
        if layer.max_value is not None:
            value = _clip(ctx, value, None, float(layer.max_value))
    elif layer.max_value is not None:
        value = _clip(ctx, value, 0.0, float(layer.max_value))
    else:
        value = ctx.b.op("Relu", [value])
    return ctx.out(value, x.perm)


@register("LeakyReLU")
def leaky_relu_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``LeakyReLU(negative_slope)``."""
    x = args[0]
    value = ctx.b.op("LeakyRelu", [x.value], {"alpha": float(layer.negative_slope)})
    return ctx.out(value, x.perm)


@register("ELU")
def elu_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ELU(alpha)``."""
    x = args[0]
    return ctx.out(ctx.b.op("Elu", [x.value], {"alpha": float(layer.alpha)}), x.perm)


@register("Softmax")
def softmax_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Softmax(axis)`` on one axis (no mask)."""
    x = args[0]
    axis = layer.axis
    if not isinstance(axis, int):
        if len(axis) != 1:
            raise ctx.unsupported("Softmax over several axes")
        axis = axis[0]
    if kwargs.get("mask") is not None or (len(args) > 1 and args[1] is not None):
        raise ctx.unsupported("Softmax with a mask")
    return ctx.out(_softmax(ctx, x.value, x.perm, int(axis)), x.perm)


def _op_activation(name: str, **fixed: Any) -> Any:
    def convert(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
        x = args[0]
        options = dict(fixed)
        for attr in ("axis", "negative_slope", "approximate", "alpha"):
            if hasattr(op, attr):
                options[attr] = getattr(op, attr)
        if name in ("softmax", "log_softmax") and not isinstance(options.get("axis", -1), int):
            raise ctx.unsupported(f"{name} over several axes")
        return ctx.out(activation_value(ctx, x.value, name, x.perm, **options), x.perm)

    return convert


for _cls, _name in (
    ("Relu", "relu"), ("Relu6", "relu6"), ("Sigmoid", "sigmoid"), ("Silu", "silu"),
    ("Swish", "silu"), ("HardSigmoid", "hard_sigmoid"), ("HardSilu", "hard_silu"),
    ("HardSwish", "hard_silu"), ("Softmax", "softmax"), ("LogSoftmax", "log_softmax"),
    ("Gelu", "gelu"), ("LeakyRelu", "leaky_relu"), ("Tanh", "tanh"), ("Elu", "elu"),
    ("Selu", "selu"), ("Softplus", "softplus"), ("Softsign", "softsign"), ("Exp", "exponential"),
):  # fmt: skip
    register(_cls, kind="op")(_op_activation(_name))
