"""The engine switch: ``export(engine=...)`` / ``bnexport export --engine``, and every export
option meaning the same on both engines (names, batch, dtypes, opsets, fused norm, int8).

Numbers against Keras within ``export_models.TOL`` (float32: ``1e-4·max|ref| + 1e-5``;
float16: ``2e-2·max|ref| + 1e-3``, the half-precision rounding of weights and activations).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import pytest
from export_models import assert_matches_keras, image_feed, randomize_biases, randomize_bn
from keras import layers as L

import bnexport
from bnexport.cli.main import main
from bnexport.errors import ExportError


def _model():
    inp = keras.Input((9, 9, 3), name="pixels")
    x = L.Conv2D(6, 3, strides=2, padding="same", name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    x = L.BatchNormalization(name="post_bn")(x)  # after an activation: the passes decide
    x = L.GlobalAveragePooling2D(name="gap")(x)
    logits = L.Dense(4, name="logits")(x)
    probs = L.Softmax(name="probs")(logits)
    model = keras.Model(inp, [logits, probs], name="two_heads")
    randomize_bn(model)
    randomize_biases(model)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


def _io(path):
    graph = onnx.load(path).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return (
        [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in graph.input],
        [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in graph.output],
    )


def test_default_engine_is_the_keras_emitter(tmp_path, model):
    report = bnexport.export(model, tmp_path / "m.onnx")
    assert (report.engine, report.fallback_reason) == ("keras", "")
    assert "engine keras" in report._caption()  # noqa: SLF001
    assert report.to_dict()["engine"] == "keras"
    assert "emit" in report.timings and "trace" not in report.timings


@pytest.mark.parametrize("static", [False, True])
def test_both_engines_same_names_shapes_and_folds(tmp_path, model, static):
    paths, reports = {}, {}
    for engine in ("keras", "tf2onnx"):
        paths[engine] = tmp_path / f"{engine}.onnx"
        reports[engine] = bnexport.export(
            model, paths[engine], engine=engine, dynamic_batch=not static
        )
        assert reports[engine].engine == engine
        feeds = image_feed("pixels", (9, 9, 3), batch=1 if static else 3)
        assert_matches_keras(paths[engine], model, feeds)
    inputs, outputs = _io(paths["keras"])
    assert (inputs, outputs) == _io(paths["tf2onnx"])
    assert [name for name, _, _ in inputs] == ["pixels"]
    assert [name for name, _, _ in outputs] == ["logits", "probs"]
    assert inputs[0][2] == ([1, 9, 9, 3] if static else ["batch", 9, 9, 3])
    assert [(r.name, r.action) for r in reports["keras"].records] == [
        (r.name, r.action) for r in reports["tf2onnx"].records
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"opset": 13},
        {"opset": 21},
        {"dtype": "float16"},
        {"dtype": "float16", "io_dtype": "float32"},
        {"fused_norm": "plugin"},
    ],
    ids=["opset13", "opset21", "float16", "float16_io32", "plugin"],
)
def test_options_on_the_emitter(tmp_path, model, options):
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path, engine="keras", **options)
    assert report.engine == "keras" and report.verify.passed
    onnx_model = onnx.load(path)
    io_dtype = options.get("io_dtype", options.get("dtype", "float32"))
    elem = onnx.TensorProto.FLOAT16 if io_dtype == "float16" else onnx.TensorProto.FLOAT
    assert onnx_model.graph.input[0].type.tensor_type.elem_type == elem
    actions = {r.name: r.action for r in report.records}
    assert actions["stem_bn"] == "folded_forward"
    if options.get("fused_norm") == "plugin":
        assert actions["post_bn"] == "fused"
        assert any(n.op_type == "FusedNorm" for n in onnx_model.graph.node)
    if "opset" in options:
        assert {o.domain: o.version for o in onnx_model.opset_import}[""] == options["opset"]
    if options.get("dtype") != "float16":
        assert_matches_keras(path, model, image_feed("pixels", (9, 9, 3)))
    else:
        assert_matches_keras(path, model, image_feed("pixels", (9, 9, 3)), dtype="float16")


def test_int8_on_the_emitter(tmp_path):
    inp = keras.Input((9, 9, 3), name="pixels")
    x = L.Conv2D(6, 3, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    model = keras.Model(inp, L.Dense(4, name="logits")(x))
    randomize_bn(model)
    rng = np.random.default_rng(0)
    calibration = [rng.uniform(-1, 1, (4, 9, 9, 3)).astype(np.float32) for _ in range(2)]
    report = bnexport.export(model, tmp_path / "q.onnx", engine="keras", int8=calibration)
    assert report.engine == "keras" and report.int8 is not None
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "QuantizeLinear" in ops


def test_unknown_engine_is_refused(tmp_path, model):
    with pytest.raises(ExportError, match=r"engine must be one of .*Received: engine='onnx'"):
        bnexport.export(model, tmp_path / "m.onnx", engine="onnx")


def test_cli_engine_option(tmp_path, model, capsys):
    src = tmp_path / "m.keras"
    model.save(src)
    for engine in ("keras", "tf2onnx"):
        out, js = tmp_path / f"{engine}.onnx", tmp_path / f"{engine}.json"
        rc = main(["export", str(src), "-o", str(out), "--engine", engine, "--json", str(js)])
        assert rc == 0
        assert f"engine {engine}" in capsys.readouterr().out
        assert json.loads(js.read_text())["engine"] == engine
    with pytest.raises(SystemExit) as exit_info:  # argparse: an invalid choice
        main(["export", str(src), "-o", str(tmp_path / "x.onnx"), "--engine", "nope"])
    assert exit_info.value.code == 2
