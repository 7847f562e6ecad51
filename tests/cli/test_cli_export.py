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
    rc = main(["export", str(keras_file), "-o", str(out), "--json", str(report_path), "-v"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bn_a" in text and "folded_forward" in text
    assert "bn_b" in text and "fused" in text
    assert "verify passed" in text and "stage times" in text
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
    assert main(["export", str(keras_file), "-o", str(bad_dir)]) == 2  # unusable argument
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnexport export: error:") and "does not exist" in err
    assert len(err.splitlines()) == 1
    assert main(["export", str(keras_file), "-o", str(tmp_path / "y.onnx"), "--opset", "9"]) == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_export_default_output_is_a_summary(tmp_path, keras_file, capsys):
    """Counts by outcome, the BN that did not fold with its reason, the path that ran."""
    assert main(["export", str(keras_file), "-o", str(tmp_path / "m.onnx")]) == 0
    text = capsys.readouterr().out
    assert "2 BN: 1 folded forward, 0 folded backward, 1 fused, 0 kept" in text
    assert "bn_b" in text and "bn_a" not in text  # only the refused BN is listed
    assert "(Keras 3 model -> " in text and " -> fold)" in text and "verify passed" in text
    assert "stage times (s)" not in text
    assert main(["export", str(keras_file), "-o", str(tmp_path / "q.onnx"), "-q"]) == 0
    assert capsys.readouterr().out == ""


def test_export_of_an_onnx_file_is_a_usage_error(tmp_path, keras_file, capsys):
    src = tmp_path / "m.onnx"
    assert main(["export", str(keras_file), "-o", str(src), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["export", str(src), "-o", str(tmp_path / "again.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is an ONNX file" in err and "bnexport fold" in err


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("engine", ["tf2onnx", "auto"])
def test_dynamic_batch_dimension_is_named_batch(tmp_path, keras_file, engine):
    out = tmp_path / "m.onnx"
    argv = ["export", str(keras_file), "-o", str(out), "--no-verify", "-q", "--engine", engine]
    assert main(argv) == 0
    model = onnx.load(out)
    assert _dims(model.graph.input[0]) == ["batch", 8, 8, 3]
    assert _dims(model.graph.output[0]) == ["batch", 6, 6, 4]


@pytest.fixture(scope="module")
def any_size_keras_file(tmp_path_factory):
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(1)
    bn.moving_mean.assign(rng.normal(size=4).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 4).astype(np.float32))
    path = tmp_path_factory.mktemp("any") / "any.keras"
    model.save(path)
    return path, model


@pytest.mark.parametrize("engine", ["tf2onnx", "auto"])
@pytest.mark.parametrize(
    ("spec", "expected"),
    [("image:2x10x12x3", [2, 10, 12, 3]), ("image:-1x10x12x3", ["batch", 10, 12, 3])],
)
def test_input_shape_override(tmp_path, any_size_keras_file, spec, expected, engine):
    src, model = any_size_keras_file
    out = tmp_path / "m.onnx"
    argv = ["export", str(src), "-o", str(out), "--input-shape", spec, "-q", "--engine", engine]
    assert main(argv) == 0
    graph = onnx.load(out)
    assert _dims(graph.graph.input[0]) == expected
    import onnxruntime as ort

    x = np.random.default_rng(2).uniform(-1, 1, (2, 10, 12, 3)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})[0]
    # float32 conv + folded BN vs Keras: rtol/atol 1e-4 (bnexport.tolerance's fp32 row)
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mask:1x8x8x3", "unknown input(s) 'mask'"),
        ("image:1x8x3", "rank 3"),
        ("image:1x8x8x5", "dimension 3 is 3 in the model"),
        ("image:1x8x", "--input-shape takes"),
    ],
)
def test_input_shape_errors_exit_2(tmp_path, any_size_keras_file, capsys, spec, message):
    src, _ = any_size_keras_file
    assert main(["export", str(src), "-o", str(tmp_path / "m.onnx"), "--input-shape", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "m.onnx").exists()


def test_python_api_input_shapes(tmp_path, any_size_keras_file):
    from bnexport.export.keras_export import export

    src, _ = any_size_keras_file
    report = export(src, tmp_path / "m.onnx", input_shapes={"image": (1, 16, 16, 3)})
    assert report.inputs == {"image": [1, 16, 16, 3]} and not report.dynamic_batch
    assert report.verify is not None and report.verify.passed


def test_export_int8(tmp_path, any_size_keras_file, capsys):
    keras_file, _ = any_size_keras_file
    calib = tmp_path / "calib.npy"
    rng = np.random.default_rng(3)
    np.save(calib, rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32))
    out, js = tmp_path / "m.int8.onnx", tmp_path / "r.json"
    argv = ["export", str(keras_file), "-o", str(out), "--int8", str(calib), "--json", str(js)]
    assert main(argv + ["--input-shape", "image:-1x8x8x3"]) == 0
    assert "int8 QDQ" in capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert json.loads(js.read_text())["int8"] is not None
    bad = ["export", str(keras_file), "-o", str(out), "--int8", str(calib), "--dtype", "float16"]
    assert main(bad) == 2


def test_progress_callback_reports_every_stage(tmp_path, keras_file):
    from bnexport.export.keras_export import export

    calls = []
    export(keras_file, tmp_path / "m.onnx", progress=lambda *a: calls.append(a))
    steps = [c[0] for c in calls]
    assert steps[0] == "loading the model" and "verifying against the model" in steps
    assert [c[1] for c in calls] == list(range(len(calls)))  # done counts up by one
    assert {c[2] for c in calls} == {len(calls)}  # the total is known from the start


def test_cli_prints_no_tensorflow_log_line_and_fits_80_columns(tmp_path, keras_file):
    """A fresh process: TensorFlow's C++ lines (absl, oneDNN, cuInit) are silenced."""
    import os
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")
    }
    env["COLUMNS"] = "80"
    argv = [sys.executable, "-m", "bnexport", "export", str(keras_file)]
    proc = subprocess.run(
        argv + ["-o", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, proc.stdout
