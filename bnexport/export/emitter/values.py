"""What the emitter knows about each value it wrote: the ONNX value, its layout, its origin.

Layout
------
The emitter runs image models in NCHW inside the graph while Keras sees NHWC. Each
emitted :class:`Tensor` carries ``perm`` with ``onnx_value = keras_tensor.transpose(perm)``
(identity for a tensor in Keras's own layout, ``(0, 3, 1, 2)`` for an NHWC tensor stored
NCHW). A converter asks the builder for the layout it needs
(:meth:`~bnexport.export.emitter.builder.Builder.in_layout`); a ``Transpose`` is inserted
only where the layouts differ, and cached, so an NHWC input feeding several convolutions
is transposed once.

Fold bookkeeping
----------------
``linear`` is set on the output of a Conv/Gemm/MatMul the emitter wrote itself (no
activation after it): a batch normalization consuming such a tensor, as its only consumer
in the Keras graph (``consumers == 1``), is folded into its weights as it is emitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir


def identity(rank: int) -> tuple[int, ...]:
    """The identity permutation of ``rank`` axes."""
    return tuple(range(rank))


def channels_first(rank: int) -> tuple[int, ...]:
    """``perm`` that stores a channels-last tensor of ``rank`` channels-first (NC...)."""
    if rank < 3:
        return identity(rank)
    return (0, rank - 1, *range(1, rank - 1))


def inverse(perm: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``inv`` with ``x.transpose(perm).transpose(inv) == x``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@dataclasses.dataclass(eq=False)
class Linear:
    """The linear op that produced a tensor, for folding a following BN into it.

    Attributes:
        node: the ``Conv``, ``Gemm`` or ``MatMul`` node.
        weight: its weight initializer (Conv ``[M, C/g, k…]``; Gemm/MatMul ``[K, N]``).
        bias: its bias initializer ``[M]``, or ``None``.
        out_axis: weight axis of the output channel (Conv: 0; Gemm/MatMul: 1).
        channel_axis: ONNX axis of the output channel in the produced tensor.
        bias_node: the ``Add`` holding a MatMul's bias, when there is one.
    """

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    out_axis: int
    channel_axis: int
    bias_node: ir.Node | None = None


@dataclasses.dataclass(eq=False)
class Tensor:
    """One emitted value standing for one Keras tensor.

    Attributes:
        value: the ONNX value.
        perm: ``value = keras_tensor.transpose(perm)``.
        shape: the Keras shape (``None`` for unknown dimensions; the batch too).
        dtype: the Keras dtype name (``"float32"``, ``"int32"``, ...).
        keras_id: ``id`` of the Keras tensor this stands for in the graph being walked.
        consumers: how many nodes (and model outputs) of that graph read it.
        linear: the producing linear op, when a BN may fold into it (see module doc).
    """

    value: ir.Value
    perm: tuple[int, ...]
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    keras_id: int | None = None
    consumers: int = 0
    linear: Linear | None = None

    @property
    def rank(self) -> int:
        """Number of axes."""
        return len(self.shape)

    def onnx_axis(self, keras_axis: int) -> int:
        """ONNX axis of ``value`` holding Keras axis ``keras_axis`` (may be negative)."""
        return self.perm.index(keras_axis % self.rank)

    def alias(self, keras_id: int | None, consumers: int) -> Tensor:
        """The same value standing for another Keras tensor (a nested graph's input/output).

        ``linear`` survives only when this tensor had one consumer in its own graph (the
        nested call, or the nested graph's output): a BN on the other side of the boundary
        may fold into the producer only if nothing else reads its output.
        """
        linear = self.linear if self.consumers <= 1 else None
        return dataclasses.replace(self, keras_id=keras_id, consumers=consumers, linear=linear)


def is_tensor(obj: Any) -> bool:
    """Whether ``obj`` is an emitted :class:`Tensor`."""
    return isinstance(obj, Tensor)
