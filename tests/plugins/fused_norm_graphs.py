"""Small ONNX graphs with one FusedNorm node, for the plugin tests."""

from __future__ import annotations

import onnx
from bnexport_plugins.fused_norm import onnx_node
from onnx import TensorProto, helper


def fused_norm_model(
    elem: int,
    shape: list,
    opset: int = 18,
    wrap_cast: bool = False,
    stats_shape: list | None = None,
    **attrs,
) -> onnx.ModelProto:
    """``X -> FusedNorm -> Y`` (and batch_mean / batch_var with ``return_stats=1``).

    ``wrap_cast`` feeds a float32 ``X`` through Cast(elem) and casts Y back to float32
    (ONNX Runtime's Python API cannot feed bfloat16 arrays).
    """
    onnx_node.register_onnx_schema()
    axis = attrs.get("axis", 1)
    c = shape[axis] if axis < len(shape) else shape[-1]
    outs = ["y", "mean", "var"] if attrs.get("return_stats") else ["y"]
    nodes = []
    x_name, y_name = "x", "y"
    io_elem = TensorProto.FLOAT if wrap_cast else elem
    if wrap_cast:
        nodes.append(helper.make_node("Cast", ["x"], ["x_cast"], to=elem))
        x_name, y_name = "x_cast", "y_cast"
    nodes.append(
        onnx_node.make_node([x_name, "scale", "shift"], [y_name, *outs[1:]], name="fn", **attrs)
    )
    if wrap_cast:
        nodes.append(helper.make_node("Cast", ["y_cast"], ["y"], to=TensorProto.FLOAT))
    vbs = attrs.get("virtual_batch_size", 0)
    if stats_shape is None:
        stats_shape = [c] if not vbs else ["G", c]
    outputs = [helper.make_tensor_value_info("y", io_elem, shape)]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, stats_shape) for n in outs[1:]]
    graph = helper.make_graph(
        nodes,
        "fused_norm",
        [
            helper.make_tensor_value_info("x", io_elem, shape),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [c]),
            helper.make_tensor_value_info("shift", TensorProto.FLOAT, [c]),
        ],
        outputs,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), onnx_node.opset_import()]
    )
