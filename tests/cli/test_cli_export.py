"""``bnexport export``: table on stdout, JSON report, errors as one line."""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import pytest

from bnexport.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    model = keras.Model(inp, keras.layers.ReLU()(x))
    for name in ("bn_a", "bn_b"):
        bn = model.get_layer(name)
        bn.moving_mean.assign(rng.normal(size=4).astype(np.float32))
        bn.moving_variance.assign(rng.uniform(0.5, 2, 4).astype(np.float32))
    path = tmp_path_factory.mktemp("model") / "m.keras"
    model.save(path)
    return path


def test_export_prints_table_and_writes_json(tmp_path, keras_file, capsys):
    out = tmp_path / "m.onnx"
    report_path = tmp_path / "r.json"
    rc = main(["export", str(keras_file), "-o", str(out), "--json", str(report_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bn_a" in text and "folded_forward" in text
    assert "bn_b" in text and "fused" in text
    assert "verify passed" in text
    data = json.loads(report_path.read_text())
    assert {r["name"]: r["action"] for r in data["records"]} == {
        "bn_a": "folded_forward",
        "bn_b": "fused",
    }
    assert data["verify"]["passed"] and data["path"] == str(out)
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_export_options(tmp_path, keras_file, capsys):
    out = tmp_path / "m16.onnx"
    args = ["export", str(keras_file), "-o", str(out), "--dtype", "float16"]
    args += ["--static-batch", "--fused-norm", "plugin", "--no-verify", "--opset", "18"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "not verified" in text
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert any(n.op_type == "FusedNorm" for n in model.graph.node)


def test_errors_are_one_line(tmp_path, keras_file, capsys):
    assert main(["export", str(tmp_path / "missing.keras"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad_dir = tmp_path / "absent" / "x.onnx"
    assert main(["export", str(keras_file), "-o", str(bad_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnexport export: error:") and "does not exist" in err
    assert len(err.splitlines()) == 1
    assert main(["export", str(keras_file), "-o", str(tmp_path / "y.onnx"), "--opset", "9"]) == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
