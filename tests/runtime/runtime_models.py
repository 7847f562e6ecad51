"""Small ONNX graphs built with onnx.helper, with their NumPy reference (runtime tests)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
SCALE = np.linspace(0.5, 1.5, 3, dtype=np.float32)  # FusedNorm's per-channel scale / shift
SHIFT = np.linspace(-0.1, 0.1, 3, dtype=np.float32)


def dense_relu_model(batch: int | str = "N") -> onnx.ModelProto:
    """``y = relu(x @ W + B)`` and ``z = x @ W + B`` for ``x: float32[N, 4]``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "B"], ["z"], name="add"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "dense_relu",
        [x],
        [y, z],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def dense_relu_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    z = x.astype(np.float64) @ W.astype(np.float64) + B
    return {"y": np.maximum(z, 0.0), "z": z}


def two_input_model() -> onnx.ModelProto:
    """``s = a + b`` with ``a: float32[N, 2]``, ``b: int64[N, 2]`` cast to float."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 2])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 2])
    nodes = [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "bf"], ["s"]),
    ]
    graph = helper.make_graph(nodes, "two_inputs", [a, b], [s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fused_norm_dense_model() -> onnx.ModelProto:
    """``y = FusedNorm(x @ W + B)`` (affine, axis 1) for ``x: float32[N, 4]``: a plugin graph."""
    from bnexport_plugins.fused_norm.onnx_node import make_node, opset_import, register_onnx_schema

    register_onnx_schema()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "B"], ["z"], name="add"),
        make_node(["z", "scale", "shift"], ["y"], name="bn", axis=1),
    ]
    initializers = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(B, "B"),
        numpy_helper.from_array(SCALE, "scale"),
        numpy_helper.from_array(SHIFT, "shift"),
    ]
    graph = helper.make_graph(nodes, "fused_norm_dense", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 8
    return model


def fused_norm_dense_reference(x: np.ndarray) -> np.ndarray:
    """``y`` of :func:`fused_norm_dense_model` in float64 (affine: ``z · scale + shift``)."""
    return dense_relu_reference(x)["z"] * SCALE.astype(np.float64) + SHIFT
