"""Find normalizations and collapse each into one ``ChannelAffine`` placeholder.

Two kinds of node are an *affine element* ``y = x · s + t`` on one channel axis:

- an inference-mode ``BatchNormalization`` (``training_mode=0``, spec default
  ``epsilon=1e-5``, constant parameters, only output 0 used):
  ``s = γ/√(var+ε)``, ``t = β − μ·s`` (``bn_scale_shift``, float64), channel axis 1;
- ``Mul``/``Add``/``Sub``/``Div`` of the data and a constant that broadcasts along exactly
  one axis (``[C]``, ``[C,1,1]``, ``[1,C,1,1]``, …) without growing the data's shape —
  the channel axis is where the constant's one non-1 dimension lands when right-aligned
  against the data's rank (``x·c``: ``s=c``; ``x+c``: ``t=c``; ``x−c``: ``t=−c``;
  ``c−x``: ``s=−1, t=c``; ``x/c``: ``s=1/c``). A size-1 constant is a scalar element.

A chain of elements, each the single consumer of the previous one, composes into one
``(scale, shift)``: ``S ← S·s``, ``T ← T·s + t`` — this is how tf2onnx emits Keras 3 BN
(``Mul, Add`` or ``Mul, Mul, Sub, Add``). A chain of scalars only, or a lone ``Add``
(a bias), is not a normalization and is left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnexport.errors import FoldError
from bnexport.export.fold_math import bn_scale_shift
from bnexport.export.passes.context import (
    AFFINE_OP,
    INTERNAL_DOMAIN,
    META_KEY,
    AffineSpec,
    FoldContext,
    FoldPass,
)
from bnexport.graph.utils import (
    FLOAT_TYPES,
    const_array,
    rank_of,
    single_consumer,
    static_dim,
    take_over,
)

_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")
_BN_FIELDS = ("scale", "B", "input_mean", "input_var")


@dataclasses.dataclass
class Element:
    """One affine element ``y = x · scale + shift`` (scale/shift float64, ``()`` or ``[C]``)."""

    node: ir.Node
    data: ir.Value
    scale: np.ndarray
    shift: np.ndarray
    axis: int | None  # negative channel axis; None for a scalar element
    rank: int
    dtype: ir.DataType


def is_training_bn(node: ir.Node) -> bool:
    """A ``BatchNormalization`` with ``training_mode=1``."""
    return is_bn(node) and node.attributes.get_int("training_mode", 0) == 1


def is_bn(node: ir.Node) -> bool:
    """An ONNX-domain ``BatchNormalization`` node."""
    return node.op_type == "BatchNormalization" and node.domain == ""


def match_bn(node: ir.Node, ctx: FoldContext) -> Element | str:
    """Match an inference-mode BN; return the element or why it cannot be folded."""
    x = node.inputs[0]
    if node.attributes.get_int("spatial", 1) == 0:
        return "BN has spatial=0 (per-element statistics)"
    if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return "BN's secondary outputs (mean/var) are consumed"
    if x is None:
        return "BN has no input"
    params = []
    for index, field in enumerate(_BN_FIELDS, start=1):
        value = node.inputs[index] if len(node.inputs) > index else None
        array = const_array(value)
        if array is None:
            return f"BN input '{field}' is not a constant initializer"
        params.append(array)
    rank = rank_of(x)
    if rank is None:
        failed = f" (shape inference failed: {ctx.shape_error})" if ctx.shape_error else ""
        return f"BN input rank is unknown{failed}"
    if rank < 2:
        return f"BN input rank is {rank}, need >= 2"
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    scale, shift = bn_scale_shift(*params, epsilon, name=ctx.node_label(node))
    channels = static_dim(x, 1)
    if channels is not None and channels != scale.shape[0]:
        raise FoldError(
            f"{ctx.node_label(node)}: BatchNormalization input has {channels} channels but "
            f"its parameters have {scale.shape[0]}"
        )
    dtype = x.dtype or node.outputs[0].dtype
    if dtype not in FLOAT_TYPES:
        return f"BN input type {dtype} is not a float type this pass handles"
    return Element(node, x, scale, shift, 1 - rank, rank, dtype)


def _channel_axis(const: np.ndarray, data: ir.Value, rank: int) -> int | None | str:
    """Negative channel axis of ``const`` against ``data``; None for scalar; str if not."""
    if const.size == 1:
        return None if const.ndim <= rank else "constant has a higher rank than the data"
    if const.ndim > rank:
        return "constant has a higher rank than the data"
    wide = [j for j, d in enumerate(const.shape) if d != 1]
    if len(wide) != 1:
        return "constant varies along more than one axis"
    axis = wide[0] - const.ndim
    if static_dim(data, axis) != const.shape[wide[0]]:
        return "constant's channel size does not match the data's"
    return axis


def match_elementwise(node: ir.Node) -> Element | None:
    """Match ``Mul``/``Add``/``Sub``/``Div`` with one per-channel (or scalar) constant."""
    if node.domain != "" or node.op_type not in _ELEMENTWISE or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is None or b is None:
        return None
    ca, cb = const_array(a), const_array(b)
    if (ca is None) == (cb is None):
        return None
    const, data, const_first = (ca, b, True) if ca is not None else (cb, a, False)
    dtype = data.dtype or ir.DataType.from_numpy(const.dtype)
    if dtype not in FLOAT_TYPES or const.dtype.kind != "f":
        return None
    rank = rank_of(data)
    if rank is None:
        return None
    axis = _channel_axis(const, data, rank)
    if isinstance(axis, str):
        return None
    c = const.astype(np.float64).reshape(-1) if axis is not None else np.float64(const.flat[0])
    one, zero = np.ones_like(c), np.zeros_like(c)
    op = node.op_type
    if op == "Mul":
        scale, shift = c, zero
    elif op == "Add":
        scale, shift = one, c
    elif op == "Sub":
        scale, shift = (-one, c) if const_first else (one, -c)
    else:  # Div
        if const_first or not np.all(c != 0):
            return None
        scale, shift = 1.0 / c, zero
    return Element(node, data, np.asarray(scale), np.asarray(shift), axis, rank, dtype)


def match_element(node: ir.Node, ctx: FoldContext) -> Element | str | None:
    """An affine element, a refusal reason (for a BN), or ``None`` (not a candidate)."""
    if is_bn(node):
        if is_training_bn(node):
            return None
        return match_bn(node, ctx)
    return match_elementwise(node)


def grow_chain(head: Element, ctx: FoldContext) -> list[Element]:
    """Extend ``head`` through single-consumer affine elements on the same channel axis."""
    chain = [head]
    axis = head.axis
    while True:
        out = chain[-1].node.outputs[0]
        nxt = single_consumer(out)
        if nxt is None:
            return chain
        element = match_element(nxt, ctx)
        if not isinstance(element, Element) or element.data is not out:
            return chain
        if axis is not None and element.axis is not None and element.axis != axis:
            return chain
        chain.append(element)
        axis = axis if axis is not None else element.axis


def is_normalization(chain: list[Element]) -> bool:
    """A chain worth folding: it has a channel axis and is not a lone bias ``Add``/``Sub``."""
    if all(e.axis is None for e in chain):
        return False
    return not (len(chain) == 1 and chain[0].node.op_type in ("Add", "Sub"))


def compose(chain: list[Element]) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of the whole chain, float64 ``[C]``."""
    scale, shift = np.float64(1.0), np.float64(0.0)
    channels = next(e.scale.shape[0] for e in chain if e.axis is not None)
    for e in chain:
        scale = scale * e.scale
        shift = shift * e.scale + e.shift
    return (
        np.broadcast_to(scale, (channels,)).astype(np.float64),
        np.broadcast_to(shift, (channels,)).astype(np.float64),
    )


def chain_labels(chain: list[Element], ctx: FoldContext) -> list[str]:
    """Report names: BN nodes and mapped nodes, once each; else the first node's name."""
    labels: list[str] = []
    for e in chain:
        label = ctx.label(e.node)
        if label is None and is_bn(e.node):
            label = ctx.node_label(e.node)
        if label is not None and label not in labels:
            labels.append(label)
    return labels or [ctx.node_label(chain[0].node)]


def replace_chain(graph: ir.Graph, chain: list[Element], ctx: FoldContext) -> ir.Node:
    """Swap the chain's nodes for one placeholder node; the output keeps its name."""
    scale, shift = compose(chain)
    axis = next(e.axis for e in chain if e.axis is not None)
    spec = AffineSpec(
        labels=chain_labels(chain, ctx),
        sources=[e.node.name or "" for e in chain],
        scale=scale,
        shift=shift,
        axis=axis,
        rank=chain[0].rank,
        dtype=chain[0].dtype,
        has_bn=any(is_bn(e.node) for e in chain),
    )
    last_out = chain[-1].node.outputs[0]
    node = ir.Node(INTERNAL_DOMAIN, AFFINE_OP, [chain[0].data])
    node.meta[META_KEY] = spec
    out = node.outputs[0]
    out.type = last_out.type or ir.TensorType(spec.dtype)
    out.shape = last_out.shape
    graph.insert_before(chain[-1].node, node)
    take_over(graph, last_out, out)  # removes the last node of the chain
    graph.remove([e.node for e in chain[:-1]], safe=True)
    node.name = chain[0].node.name
    return node


class CanonicalizeAffinePass(FoldPass):
    """Collapse every foldable BN / constant Mul-Add chain into one placeholder node."""

    def requires(self, model: ir.Model) -> None:
        """The model must import the default ONNX domain at opset >= 7."""
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if version is None or version < 7:
            raise ir.passes.PreconditionError(
                f"fold_batchnorm needs ONNX opset >= 7 in opset_import. Received: {version}"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Replace each chain; record BNs that cannot be folded at all as ``kept``."""
        graph = model.graph
        done: set[int] = set()
        modified = False
        for node in list(graph):
            if id(node) in done or node.graph is not graph:
                continue
            head = match_element(node, self.ctx)
            if isinstance(head, str):
                self.ctx.record([self.ctx.node_label(node)], "kept", None, head)
                continue
            if head is None:
                continue
            chain = grow_chain(head, self.ctx)
            if not is_normalization(chain):
                continue
            done.update(id(e.node) for e in chain)
            replace_chain(graph, chain, self.ctx)
            modified = True
        return ir.passes.PassResult(model, modified)
