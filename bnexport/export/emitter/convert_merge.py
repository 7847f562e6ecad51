"""Merges and elementwise arithmetic: merge layers, ``Concatenate`` and ``keras.ops`` nodes.

Layers ``Add``/``Multiply``/``Subtract``/``Average``/``Maximum``/``Minimum``/``Concatenate``;
``keras.ops`` nodes ``add``, ``subtract``, ``multiply``, ``divide``, ``maximum``,
``minimum``, ``concatenate``, ``negative``, ``sqrt``, ...

Operands of one op must share a layout: every tensor operand is brought to the layout of
the first operand of the highest rank (when all ranks agree; else all go to Keras
layout, where Keras's right-aligned broadcasting holds as is). Constant operands (Python
numbers, arrays) are laid out the same way (:meth:`Builder.broadcast_const`).
Concatenation axes are mapped through the layout.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import numpy as np
import onnx_ir as ir

from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Tensor, identity


def align(ctx: EmitContext, operands: list[Any]) -> tuple[list[ir.Value], tuple[int, ...]]:
    """The operands as values in one common layout, and that layout."""
    tensors = [o for o in operands if isinstance(o, Tensor)]
    if not tensors:
        raise ctx.unsupported("an operation on constants only")
    rank = max(t.rank for t in tensors)
    same = all(t.rank == rank for t in tensors)
    lead = next(t for t in tensors if t.rank == rank)
    perm = lead.perm if same else identity(rank)
    dtype = (
        np.dtype(lead.dtype)
        if lead.dtype in ("float32", "float16", "int32", "int64")
        else np.float32
    )
    values = []
    for o in operands:
        if isinstance(o, Tensor):
            values.append(ctx.b.in_layout(o, perm))
        else:
            values.append(
                ctx.b.broadcast_const(
                    np.asarray(constant_array(ctx, o), dtype), perm, rank, "const"
                )
            )
    return values, perm


def constant_array(ctx: EmitContext, obj: Any) -> np.ndarray:
    """A non-tensor operand (number, array, Keras constant) as a NumPy array."""
    if isinstance(obj, int | float | np.ndarray | np.generic | list | tuple):
        return np.asarray(obj)
    try:
        from keras import ops

        return np.asarray(ops.convert_to_numpy(obj))
    except Exception as exc:  # noqa: BLE001
        raise ctx.unsupported(f"operand of type {type(obj).__name__}") from exc


def _chain(ctx: EmitContext, op_type: str, operands: list[Any]) -> Tensor:
    values, perm = align(ctx, operands)
    out = reduce(lambda a, v: ctx.b.op(op_type, [a, v]), values[1:], values[0])
    return ctx.out(out, perm)


def _list(args: tuple) -> list[Any]:
    return list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)


@register("Add")
def add_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Add``: ``x₁ + x₂ + …``."""
    return _chain(ctx, "Add", _list(args))


@register("Multiply")
def multiply_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Multiply``: ``x₁ · x₂ · …``."""
    return _chain(ctx, "Mul", _list(args))


@register("Subtract")
def subtract_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Subtract``: ``x₁ − x₂``."""
    return _chain(ctx, "Sub", _list(args))


@register("Maximum")
def maximum_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Maximum`` of the inputs."""
    values, perm = align(ctx, _list(args))
    return ctx.out(ctx.b.op("Max", values), perm)


@register("Minimum")
def minimum_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Minimum`` of the inputs."""
    values, perm = align(ctx, _list(args))
    return ctx.out(ctx.b.op("Min", values), perm)


@register("Average")
def average_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Average``: the sum over the count."""
    operands = _list(args)
    values, perm = align(ctx, operands)
    total = ctx.b.op("Sum", values)
    scale = ctx.b.const(np.asarray(1.0 / len(operands), np.float32), "inv_count")
    return ctx.out(ctx.b.op("Mul", [total, scale]), perm)


def _concat(ctx: EmitContext, operands: list[Any], axis: int) -> Tensor:
    values, perm = align(ctx, operands)
    rank = len(perm)
    return ctx.out(ctx.b.op("Concat", values, {"axis": perm.index(axis % rank)}), perm)


@register("Concatenate")
def concatenate_layer(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Concatenate(axis)``: the axis mapped through the common layout."""
    return _concat(ctx, _list(args), int(layer.axis))


def _binary(op_type: str) -> Any:
    def convert(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
        return _chain(ctx, op_type, [args[0], args[1] if len(args) > 1 else kwargs["x2"]])

    return convert


for _cls, _op in (
    ("Add", "Add"), ("Subtract", "Sub"), ("Multiply", "Mul"), ("Divide", "Div"),
    ("TrueDivide", "Div"), ("Maximum", "Max"), ("Minimum", "Min"), ("Power", "Pow"),
):  # fmt: skip
    register(_cls, kind="op")(_binary(_op))


def _unary(op_type: str) -> Any:
    def convert(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
        x = args[0]
        return ctx.out(ctx.b.op(op_type, [x.value]), x.perm)

    return convert


for _cls, _op in (
    ("Negative", "Neg"), ("Sqrt", "Sqrt"), ("Abs", "Abs"), ("Absolute", "Abs"),
    ("Exp", "Exp"), ("Log", "Log"), ("Reciprocal", "Reciprocal"), ("Erf", "Erf"),
    ("Floor", "Floor"), ("Ceil", "Ceil"),
):  # fmt: skip
    register(_cls, kind="op")(_unary(_op))


@register("Square", kind="op")
def square_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.square``: ``x · x``."""
    x = args[0]
    return ctx.out(ctx.b.op("Mul", [x.value, x.value]), x.perm)


@register("Rsqrt", kind="op")
def rsqrt_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.rsqrt``: ``1 / √x``."""
    x = args[0]
    return ctx.out(ctx.b.op("Reciprocal", [ctx.b.op("Sqrt", [x.value])]), x.perm)


@register("Concatenate", kind="op")
def concatenate_op(ctx: EmitContext, op: Any, args: tuple, kwargs: dict) -> Tensor:
    """``ops.concatenate(xs, axis)``."""
    if op.axis is None:
        raise ctx.unsupported("concatenate with axis=None")
    return _concat(ctx, _list(args[:1]), int(op.axis))
