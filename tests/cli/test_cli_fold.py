"""``bnexport fold``: folds a file, prints the per-BN table, writes JSON, fails cleanly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from bnexport.cli.main import main

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,6,6] x) => (float[N,4,4,4] y, float[N,4,4,4] z) {
  c = Conv(x, W)
  n1 = BatchNormalization(c, g, b, m, v)
  y = Relu(n1)
  z = BatchNormalization(y, g, b, m, v)
}"""


@pytest.fixture
def model_path(tmp_path):
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(TEXT)
    arrays = {
        "W": rng.normal(0, 0.5, (4, 3, 3, 3)),
        "g": rng.uniform(0.5, 2, 4),
        "b": rng.normal(0, 1, 4),
        "m": rng.normal(0, 1, 4),
        "v": rng.uniform(0.5, 2, 4),
    }
    for name, array in arrays.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    for node, name in zip(model.graph.node, ["conv", "bn1", "relu", "bn2"], strict=True):
        node.name = name
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    return path


def _run(path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


def test_fold_writes_model_table_and_json(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["fold", str(model_path), "-o", str(out), "--json", str(report)]) == 0
    text = capsys.readouterr().out  # default: the BN that did not fold, and the summary
    assert "bn2" in text and "fused" in text and "bn1" not in text
    assert "2 BN: 1 folded forward, 0 folded backward, 1 fused, 0 kept; nodes 4 -> 3" in text
    data = json.loads(report.read_text())
    assert [(r["name"], r["action"]) for r in data["records"]] == [
        ("bn1", "folded_forward"),
        ("bn2", "fused"),
    ]
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 1
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    for a, e in zip(_run(out, {"x": x}), _run(model_path, {"x": x}), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * np.abs(e).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "report.json"]


def test_fold_verbose_lists_every_bn(model_path, tmp_path, capsys):
    assert main(["fold", str(model_path), "-o", str(tmp_path / "out.onnx"), "-v"]) == 0
    text = capsys.readouterr().out
    assert "bn1" in text and "folded_forward" in text and "bn2" in text
    assert main(["fold", str(model_path), "-o", str(tmp_path / "out2.onnx"), "-q"]) == 0
    assert capsys.readouterr().out == ""


def test_fold_plugin_mode(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["fold", str(model_path), "-o", str(out), "--fused-norm", "plugin"]) == 0
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "FusedNorm"]
    assert "fused" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "message"),
    [("missing", "no such file"), ("folder", "is a folder"), ("junk", "not a readable ONNX model")],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, case, message):
    src = {"missing": tmp_path / "missing.onnx", "folder": tmp_path, "junk": tmp_path / "j.onnx"}
    if case == "junk":
        src["junk"].write_bytes(b"\xff\x00garbage" * 10)
    out = tmp_path / "out.onnx"
    assert main(["fold", str(src[case]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnexport fold: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_unwritable_output_folder_leaves_nothing(model_path, tmp_path, capsys):
    out = tmp_path / "nope" / "out.onnx"
    assert main(["fold", str(model_path), "-o", str(out)]) == 2  # an unusable argument
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_bad_statistics_fail_with_node_name(tmp_path, capsys):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x) => (float[N,2] y) { y = BatchNormalization(x, g, b, m, v) }"""
    )
    for name, values in {"g": [1, 1], "b": [0, 0], "m": [0, 0], "v": [1, -1]}.items():
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array(values, np.float32), name)
        )
    model.graph.node[0].name = "head_bn"
    src, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert main(["fold", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "bnexport fold: error: head_bn: moving_variance is negative at channel 1 (-1)"
    assert not out.exists()


def test_model_without_bn_says_so(tmp_path, capsys):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] x) => (float[N,2] y) { y = Relu(x) }"""
    )
    src, out = tmp_path / "plain.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert main(["fold", str(src), "-o", str(out)]) == 0
    assert "no batch normalization found; nodes 1 -> 1" in capsys.readouterr().out
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Relu"]
