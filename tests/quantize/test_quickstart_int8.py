"""The quickstart's INT8 step: target picked for the CPU, both errors, accuracy and latency.

The model is a digits MLP whose last layer is fitted by ridge regression here (a trained
classifier, so top-1 agreement means something); accuracies are recomputed from the
graphs' predictions with NumPy.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from bnexport.data.digits import load_digits
from bnexport.quantize.kernel_emulation import EmulatedSession
from bnexport.quantize.quickstart_step import int8_step
from bnexport.runtime.cpu_features import ENV_VAR, hardware_int8_features
from bnexport.runtime.ort_session import make_session


def _digits_mlp(data) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = np.asarray(data.x_train, np.float64).reshape(len(data.x_train), -1)
    w1 = rng.normal(0, 0.3, (64, 128))
    h = np.maximum(x @ w1, 0)
    target = np.eye(10)[data.y_train] * 2 - 1
    hb = np.c_[h, np.ones(len(h))]
    w2 = np.linalg.solve(hb.T @ hb + 10.0 * np.eye(hb.shape[1]), hb.T @ target)  # ridge
    nodes = [
        helper.make_node("Flatten", ["image"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
        helper.make_node("Add", ["z", "b2"], ["logits"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(w2[:-1].astype(np.float32), "w2"),
            numpy_helper.from_array(w2[-1].astype(np.float32), "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def data():
    return load_digits(seed=0)


def _accuracy(session, data) -> float:
    x = np.asarray(data.x_test, np.float32)
    logits = np.asarray(session.run(None, {"image": x})[0])
    return float(np.mean(logits.argmax(1) == data.y_test))


@pytest.mark.parametrize("override", ["vnni", "novnni"])
def test_int8_step_picks_target_and_reports_both_errors(tmp_path, data, monkeypatch, override):
    monkeypatch.setenv(ENV_VAR, override)
    onnx.save(_digits_mlp(data), tmp_path / "digits.onnx")
    text = io.StringIO()
    result = int8_step(
        tmp_path / "digits.onnx", data, tmp_path, Console(file=text, width=200), runs=3
    )
    assert result.target == ("tensorrt" if override == "vnni" else "cpu")
    report = result.report
    assert result.path == tmp_path / "digits.int8.onnx" and result.path.is_file()
    assert set(report.quantized_nodes) == {"fc1", "fc2"}
    assert report.eval_data == "validation" and report.eval_samples == len(data.y_test)
    assert report.reduce_range is (override == "novnni")
    # accuracy recomputed here from each graph's predictions
    fp32 = ort.InferenceSession(str(tmp_path / "digits.onnx"))
    assert result.accuracy["float32"] == _accuracy(fp32, data)
    qdq = make_session(result.path, optimize=False)
    assert result.accuracy["int8 q/dq"] == _accuracy(qdq, data)
    emulated = override == "novnni" and hardware_int8_features().int32_dot
    kernels = (
        EmulatedSession(onnx.load(result.path))
        if emulated
        else ort.InferenceSession(str(result.path))
    )
    assert result.accuracy["int8"] == _accuracy(kernels, data)
    assert ("emulated" in result.kernel_source) is emulated
    # the held-out promise: within 1 point of float32, on the CPU the step was told of
    assert abs(result.accuracy["int8"] - result.accuracy["float32"]) <= 0.01
    assert result.agreement >= 0.99
    assert all(result.latency_ms[k][b] > 0 for k in ("float32", "int8") for b in (1, 8))
    printed = text.getvalue()
    assert f"INT8 target {result.target}" in printed and "int8 top-1 agreement" in printed
    assert "quantization error only" in printed
