"""The quickstart's INT8 step: accuracy, agreement and latency of both graphs, printed."""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from bnexport.data.digits import load_digits
from bnexport.quantize.quickstart_step import int8_step


def _digits_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (64, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["image"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_int8_step_reports_both_graphs(tmp_path):
    onnx.save(_digits_mlp(), tmp_path / "digits.onnx")
    data = load_digits(seed=0)
    text = io.StringIO()
    result = int8_step(tmp_path / "digits.onnx", data, tmp_path, Console(file=text), runs=3)
    assert result.path == tmp_path / "digits.int8.onnx" and result.path.is_file()
    assert set(result.report.quantized_nodes) == {"fc1", "fc2"}
    assert result.report.eval_data == "validation"  # measured on the test split
    assert result.report.eval_samples == len(data.y_test)
    # accuracy recomputed here from the two graphs' predictions
    import onnxruntime as ort

    x = np.asarray(data.x_test, np.float32)
    for key, path in (("float32", "digits.onnx"), ("int8", "digits.int8.onnx")):
        logits = ort.InferenceSession(str(tmp_path / path)).run(None, {"image": x})[0]
        assert result.accuracy[key] == float(np.mean(logits.argmax(1) == data.y_test))
    assert 0.9 <= result.agreement <= 1.0
    assert all(result.latency_ms[k][b] > 0 for k in ("float32", "int8") for b in (1, 8))
    printed = text.getvalue()
    assert "test accuracy" in printed and "int8 top-1 agreement" in printed
