"""Rewrite ``bnexport::FusedNorm`` nodes into standard ONNX ops (any backend, no plugin).

For ``X`` of rank ``r`` with channel axis ``a``, parameters are reshaped to
``[C, 1, ..., 1]`` (``r - a - 1`` ones) so they broadcast against ``X``; math is
float32 (16-bit ``X`` is cast up and the result cast back):

    affine:       Y = act(Cast(X) * scale + shift)
    batch_stats:  V = Cast(X), reshaped to [G, vbs, d1, ...] with ghost batches
                  mean = ReduceMean(V, all axes but the group and channel axes)
                  var  = ReduceMean((V - mean)^2, same axes)       (two-pass, biased)
                  Y = act((V - mean) * (scale / Sqrt(var + eps)) + shift), reshaped back

    act: Relu | Clip(0, 6) | LeakyRelu(alpha) | Sigmoid | X * Sigmoid(X)

The ghost reshape uses the runtime shape of ``X`` (``Shape`` / ``Slice`` /
``Concat``), so dynamic batch sizes work; a batch the ghost size does not divide
fails in ``Reshape``. Needs default-domain opset >= 13 (>= 18 passes reduce axes
as an input, older as an attribute).
"""

from __future__ import annotations

import numpy as np
import onnx
from bnexport_plugins.fused_norm import spec
from onnx import helper, numpy_helper


class _Builder:
    """Appends nodes/initializers with names unique to one FusedNorm node."""

    def __init__(self, prefix: str, opset: int):
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}__{hint}_{self._n}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.name(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs)
        )
        return out

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op(
                "ReduceMean", [x, self.const("axes", np.array(axes, np.int64))], keepdims=1
            )
        return self.op("ReduceMean", [x], axes=axes, keepdims=1)


def _activation(b: _Builder, v: str, name: str, alpha: float, output: str) -> str:
    if name == "none":
        return b.op("Identity", [v], output)
    if name == "relu":
        return b.op("Relu", [v], output)
    if name == "relu6":
        zero, six = b.const("zero", np.float32(0)), b.const("six", np.float32(6))
        return b.op("Clip", [v, zero, six], output)
    if name == "leaky_relu":
        return b.op("LeakyRelu", [v], output, alpha=float(alpha))
    if name == "sigmoid":
        return b.op("Sigmoid", [v], output)
    return b.op("Mul", [v, b.op("Sigmoid", [v])], output)  # silu


def _lower_node(node: onnx.NodeProto, rank: int, elem: int, opset: int) -> _Builder:
    attrs = spec.node_attribute_values(node)
    axis, vbs = int(attrs["axis"]), int(attrs["virtual_batch_size"])
    b = _Builder(node.name or node.output[0], opset)
    x, scale, shift = node.input[:3]
    y = node.output[0]
    sixteen = elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    v = b.op("Cast", [x], to=onnx.TensorProto.FLOAT) if sixteen else x
    z_out = b.name("z") if sixteen else y
    ghost = attrs["mode"] == "batch_stats" and vbs > 0
    # channel axis (and rank) of the tensor the math runs on
    caxis, crank = (axis + 1, rank + 1) if ghost else (axis, rank)
    pshape = b.const("pshape", np.array([-1] + [1] * (crank - caxis - 1), np.int64))
    s = b.op("Reshape", [scale, pshape])
    t = b.op("Reshape", [shift, pshape])
    if attrs["mode"] == "affine":
        z = b.op("Add", [b.op("Mul", [v, s]), t])
    else:
        if ghost:
            x_shape = b.op("Shape", [v])
            rest = b.op(
                "Slice",
                [
                    x_shape,
                    b.const("one", np.array([1], np.int64)),
                    b.const("big", np.array([2**62], np.int64)),
                ],
            )
            head = b.const("head", np.array([-1, vbs], np.int64))
            v = b.op("Reshape", [v, b.op("Concat", [head, rest], axis=0)])
        axes = [i for i in range(crank) if i != caxis and not (ghost and i == 0)]
        mean = b.reduce_mean(v, axes)
        centered = b.op("Sub", [v, mean])
        var = b.reduce_mean(b.op("Mul", [centered, centered]), axes)
        eps = b.const("eps", np.float32(attrs["epsilon"]))
        a = b.op("Div", [s, b.op("Sqrt", [b.op("Add", [var, eps])])])
        z = b.op("Add", [b.op("Mul", [centered, a]), t])
        if ghost:
            z = b.op("Reshape", [z, x_shape])
        if len(node.output) >= 3:
            # keepdims stats [1, .., C, .., 1] -> [C]; ghost [G, 1, .., C, .., 1] -> [G, C]
            for stat, out in ((mean, node.output[1]), (var, node.output[2])):
                if not out:
                    continue
                if vbs == 0:
                    b.op("Reshape", [stat, b.const("flat", np.array([-1], np.int64))], out)
                else:
                    b.op("Squeeze", [stat, b.const("sq", np.array(axes, np.int64))], out)
    _activation(b, z, str(attrs["activation"]), float(attrs["alpha"]), z_out)
    if sixteen:
        b.op("Cast", [z_out], y, to=elem)
    return b


def lower_fused_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every FusedNorm node replaced by standard ONNX ops.

    Raises:
        PluginError: a node with invalid attributes or static shapes, or an input whose
            rank or element type is unknown after shape inference.
    """
    from bnexport_plugins.fused_norm.onnx_node import register_onnx_schema

    from bnexport.errors import PluginError

    register_onnx_schema()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise PluginError(f"FusedNorm lowering needs default-domain opset >= 13. Received: {opset}")
    try:
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise PluginError(str(exc)) from None
    g = inferred.graph
    infos = {vi.name: vi.type.tensor_type for vi in [*g.input, *g.value_info, *g.output]}
    infos.update(
        {
            t.name: helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type
            for t in g.initializer
        }
    )
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if not spec.is_fused_norm(node):
            nodes.append(node)
            continue
        info = infos.get(node.input[0])
        if info is None or not info.HasField("shape"):
            raise PluginError(
                f"FusedNorm node {node.name!r}: rank of X ({node.input[0]!r}) is unknown"
            )
        b = _lower_node(node, len(info.shape.dim), info.elem_type, opset)
        nodes.extend(b.nodes)
        out.graph.initializer.extend(b.inits)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    keep = [o for o in out.opset_import if o.domain != spec.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out
