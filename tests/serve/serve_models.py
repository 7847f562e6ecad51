"""Small ONNX models for the server tests, built with onnx.helper, and their NumPy references."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-3


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def digits_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.float32
    return {
        "conv_w": rng.standard_normal((4, 1, 3, 3)).astype(f) * f(0.5),
        "conv_b": rng.standard_normal(4).astype(f) * f(0.1),
        "gamma": rng.uniform(0.5, 1.5, 4).astype(f),
        "beta": rng.standard_normal(4).astype(f) * f(0.1),
        "mean": rng.standard_normal(4).astype(f) * f(0.1),
        "var": rng.uniform(0.5, 2.0, 4).astype(f),
        "fc_w": rng.standard_normal((256, 10)).astype(f) * f(0.1),
        "fc_b": rng.standard_normal(10).astype(f) * f(0.1),
    }


def digits_cnn(seed: int = 0) -> onnx.ModelProto:
    """image [N,8,8,1] -> Conv 3x3 (4) -> BatchNormalization -> Relu -> Flatten -> MatMul+Add.

    Outputs ``logits`` [N,10] and ``probs`` = softmax(logits) [N,10].
    """
    p = digits_params(seed)
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"], epsilon=BN_EPS
        ),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 1])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )


def digits_reference(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """NumPy float64 reference of :func:`digits_cnn` (NHWC input)."""
    p = {k: v.astype(np.float64) for k, v in digits_params(seed).items()}
    nchw = x.astype(np.float64).transpose(0, 3, 1, 2)
    padded = np.pad(nchw, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    conv = np.einsum("nihwkl,oikl->nohw", patches, p["conv_w"]) + p["conv_b"][None, :, None, None]
    shape = (1, 4, 1, 1)
    bn = (conv - p["mean"].reshape(shape)) / np.sqrt(p["var"].reshape(shape) + BN_EPS)
    bn = bn * p["gamma"].reshape(shape) + p["beta"].reshape(shape)
    relu = np.maximum(bn, 0.0)
    logits = relu.reshape(len(x), -1) @ p["fc_w"] + p["fc_b"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {"logits": logits, "probs": e / e.sum(axis=1, keepdims=True)}


def gather_model() -> onnx.ModelProto:
    """out[n, 0] = data[n, idx[n, 0]]; an index outside [-4, 3] makes onnxruntime raise."""
    return _model(
        [helper.make_node("GatherElements", ["data", "idx"], ["out"], axis=1)],
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1])],
        [],
    )


def fixed_batch_model() -> onnx.ModelProto:
    """y = x + 1 with a fixed batch of 1 (not batchable)."""
    one = numpy_helper.from_array(np.ones((1, 4), np.float32), "one")
    return _model(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [one],
    )


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)


def log_model() -> onnx.ModelProto:
    """y = log(x), x [N, 4] float32: log(0) = -inf, log(-1) = NaN (non-finite outputs)."""
    return _model(
        [helper.make_node("Log", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [],
    )


def infer_json_body(x: np.ndarray, name: str = "image", **extra) -> dict:
    """A KServe v2 JSON infer request with ``x`` as FP32 input ``name`` (``extra`` merged in)."""
    body = {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    body.update(extra)
    return body
