"""Merge a constant zero ``Pad`` into the ``pads`` of the ``Conv`` that reads it.

``ZeroPadding2D`` → ``Conv2D(padding="valid")`` is how Keras spells an asymmetric or
oversized convolution padding (ResNet50's stem, MobileNetV2's and EfficientNet's stride-2
blocks, NASNet's separable convs); PyTorch exports often carry the same ``Pad → Conv``.
A ``Conv`` zero-pads its input by its ``pads`` before the window slides, so padding with
zeros first and then by ``pads`` is one zero padding by the sum: for a Conv with
``pads = [b₁…bₙ, e₁…eₙ]`` reading ``Pad(x, [0, 0, p₁…pₙ, 0, 0, q₁…qₙ], mode="constant",
value=0)``::

    Conv(Pad(x)) = Conv'(x)   with   pads' = [b₁+p₁ … bₙ+pₙ, e₁+q₁ … eₙ+qₙ]

exactly, for any stride, dilation and group (the same zero-extended input, the same
windows). The rewrite saves one node and a copy of the padded tensor, and lets a
normalization in front of the ``Pad`` reach the ``Conv`` (the backward fold of
:mod:`.backward`, which stays exact: it still refuses a padded Conv unless the
normalization's shift is zero).

One ``Transpose`` between the two (``Pad → Transpose → Conv``: the emitter pads an NHWC
tensor before its NCHW ``Conv``) is looked through: Conv axis ``i`` reads the Pad's axis
``perm[i]``, and the ``Transpose`` then reads the unpadded input.

Left alone, each with its reason in :attr:`MergePadIntoConvPass.refusals`: a Pad whose
mode is not ``constant`` (reflect/edge), whose value is not a constant 0, whose pads are
not constant or negative (a crop), or that pads the batch or channel axis; a Pad (or the
Transpose) with another consumer or that is a graph output; a Conv with ``auto_pad``
``SAME_*`` (its pads depend on the padded size). Only ``Conv`` is a target: an
``AveragePool`` counts padded elements differently (``count_include_pad``), and a
``ConvTranspose``'s ``pads`` crop its output.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bnexport.graph.utils import (
    const_array,
    rank_of,
    single_consumer,
    transpose_perm,
)

log = logging.getLogger(__name__)

__all__ = ["MergePadIntoConvPass"]


def _conv_rank(conv: ir.Node) -> int | None:
    """Rank of a Conv's data input: from its weight, ``kernel_shape``, or shape inference."""
    weight = const_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is not None:
        return int(weight.ndim)
    kernel = conv.attributes.get_ints("kernel_shape")
    if kernel is not None:
        return len(kernel) + 2
    return rank_of(conv.inputs[0])


def _target(pad: ir.Node) -> tuple[ir.Node, ir.Node | None] | str:
    """``(Conv, Transpose in between or None)`` reading ``pad``'s output alone, or why not."""
    out = pad.outputs[0]
    consumer = single_consumer(out)
    if consumer is None:
        return "Pad output is a graph output or has several consumers"
    through = None
    if consumer.op_type == "Transpose" and consumer.domain == "":
        through, consumer = consumer, single_consumer(consumer.outputs[0])
        if consumer is None:
            return f"Transpose '{through.name}' after the Pad has several consumers"
    if consumer.op_type != "Conv" or consumer.domain != "":
        return f"Pad feeds {consumer.op_type} '{consumer.name}', not Conv"
    expected = (through or pad).outputs[0]
    if consumer.inputs[0] is not expected:
        return f"Pad output is not the data input of Conv '{consumer.name}'"
    return consumer, through


def _is_zero(value: ir.Value | None) -> bool | None:
    """Whether an optional ``constant_value`` input is 0 (``None``: not a constant)."""
    if value is None:
        return True
    array = const_array(value)
    if array is None:
        return None
    return array.size == 0 or bool(np.all(array == 0))


def _pad_amounts(pad: ir.Node, rank: int) -> tuple[list[int], list[int]] | str:
    """``(begins, ends)`` per axis of a constant zero Pad of a rank-``rank`` tensor, or why not."""
    name = pad.name
    mode = pad.attributes.get_string("mode", "constant")
    if mode != "constant":
        return f"Pad '{name}' has mode={mode!r}"
    inputs = list(pad.inputs) + [None] * (4 - len(pad.inputs))
    axes: list[int] | None = None
    if (attr_pads := pad.attributes.get_ints("pads")) is not None:  # opset < 11: attributes
        pads = np.asarray(attr_pads, np.int64)
        attr = pad.attributes.get("value")
        if attr is not None and attr.as_float() != 0:
            return f"Pad '{name}' pads with {attr.as_float()}, not 0"
    else:
        array = const_array(inputs[1])
        if array is None:
            return f"pads of Pad '{name}' are not a constant"
        pads = array.reshape(-1).astype(np.int64)
        zero = _is_zero(inputs[2])
        if zero is None:
            return f"constant_value of Pad '{name}' is not a constant"
        if not zero:
            return f"Pad '{name}' pads with a nonzero value"
        if inputs[3] is not None:
            axes_array = const_array(inputs[3])
            if axes_array is None:
                return f"axes of Pad '{name}' are not a constant"
            axes = [int(a) % rank for a in axes_array.reshape(-1)]
    axes = list(range(rank)) if axes is None else axes
    if pads.size != 2 * len(axes):
        return f"Pad '{name}' has {pads.size} pads for {len(axes)} axes"
    if (pads < 0).any():
        return f"Pad '{name}' has negative pads (a crop)"
    begins, ends = [0] * rank, [0] * rank
    for k, axis in enumerate(axes):
        begins[axis] += int(pads[k])
        ends[axis] += int(pads[len(axes) + k])
    return begins, ends


def check(pad: ir.Node) -> tuple[ir.Node, ir.Node | None, list[int]] | str:
    """``(Conv, Transpose or None, the Conv's new pads)`` for ``pad``, or why not."""
    target = _target(pad)
    if isinstance(target, str):
        return target
    conv, through = target
    rank = _conv_rank(conv)
    if rank is None or rank < 3:
        return f"rank of Conv '{conv.name}''s input unknown"
    amounts = _pad_amounts(pad, rank)
    if isinstance(amounts, str):
        return amounts
    begins, ends = amounts
    if through is not None:  # Conv axis i reads the Pad's axis perm[i]
        perm = transpose_perm(through, rank)
        if sorted(perm) != list(range(rank)):
            return f"Transpose '{through.name}' has perm {perm} for rank {rank}"
        begins, ends = [begins[p] for p in perm], [ends[p] for p in perm]
    if begins[0] or begins[1] or ends[0] or ends[1]:
        return f"Pad '{pad.name}' pads the batch or channel axis of Conv '{conv.name}'"
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"Conv '{conv.name}' has auto_pad={auto_pad}"
    n = rank - 2
    old = (
        [0] * (2 * n)
        if auto_pad == "VALID"
        else list(conv.attributes.get_ints("pads") or [0] * (2 * n))
    )
    if len(old) != 2 * n:
        return f"Conv '{conv.name}' has {len(old)} pads for {n} spatial axes"
    new = [old[i] + begins[2 + i] for i in range(n)] + [old[n + i] + ends[2 + i] for i in range(n)]
    return conv, through, new


class MergePadIntoConvPass(ir.passes.InPlacePass):
    """Merge every constant zero ``Pad`` into the ``Conv`` consuming it (see the module doc).

    Attributes:
        merged: ``(Pad, Conv)`` node names of each merge, in graph order.
        refusals: ``{Pad node: why it was not merged}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.merged: list[tuple[str, str]] = []
        self.refusals: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Merge what the rule allows in the main graph (not in If/Loop bodies)."""
        graph = model.graph
        for pad in [n for n in graph if n.op_type == "Pad" and n.domain == ""]:
            plan = check(pad)
            if isinstance(plan, str):
                self.refusals[pad.name or pad.outputs[0].name or "Pad"] = plan
                continue
            conv, through, pads = plan
            (through or conv).replace_input_with(0, pad.inputs[0])
            if through is not None:
                through.outputs[0].shape = None  # it now carries the unpadded tensor
            conv.attributes.pop("auto_pad", None)
            conv.attributes["pads"] = ir.AttrInt64s("pads", pads)
            graph.remove(pad, safe=True)
            self.merged.append((pad.name or "", conv.name or ""))
            log.debug("Pad '%s' merged into Conv '%s' (pads %s)", pad.name, conv.name, pads)
        return ir.passes.PassResult(model, bool(self.merged))
