"""Stages of an export: the shared timer, the ``before_write`` hook, one public ``export``.

``bnexport.export(..., int8=)`` is composed above the exporter and the quantizer
(:mod:`bnexport.compose`); the exporter only offers a hook (``before_write``) that runs on
the checked, verified graph before it is written. These tests pin that hook and the
timer both pipelines use. Numbers: the exported graph must match Keras at float32
tolerance (``max|onnx - keras| <= 1e-4·max|keras| + 1e-5``, :mod:`export_models`).
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from export_models import assert_matches_keras, image_feed, randomize_bn

import bnexport
from bnexport.compose import export as composed_export
from bnexport.errors import ExportError
from bnexport.export.keras_export import GraphStage
from bnexport.export.keras_export import export as export_float
from bnexport.stage_timer import StageTimer, op_counts


@pytest.fixture(scope="module")
def model():
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    m = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    randomize_bn(m)
    return m


def test_timer_announces_the_plan_and_records_laps():
    calls = []
    timer = StageTimer(["a", "b", "c"], progress=lambda *c: calls.append(c), texts={"b": "doing b"})
    timer.announce("a")
    timer.lap("a")
    timer.timings["b.part"] = 0.5  # a callee timed its own part of b
    timer.lap("b", record=False)
    timer.lap("c")
    timer.lap("unplanned")  # timed, not announced
    timings = timer.total()
    assert calls == [("a", 0, 3), ("doing b", 1, 3), ("c", 2, 3)]
    assert list(timings) == ["a", "b.part", "c", "unplanned", "total"]
    assert all(v >= 0 for v in timings.values())
    assert timings["total"] >= timings["a"] + timings["c"] + timings["unplanned"]


def test_op_counts_counts_each_op_type():
    graph = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] z) {
            y = Relu(x)
            w = Relu(y)
            z = Add(w, y)
        }"""
    )
    assert op_counts(graph) == {"Relu": 2, "Add": 1}


def test_before_write_stage_is_written_timed_and_announced(tmp_path, model):
    seen = {}

    def stamp(folded, records):
        seen["records"] = [r.name for r in records]
        folded.doc_string = "stamped"
        return folded

    calls = []
    path = tmp_path / "m.onnx"
    report = export_float(
        model,
        path,
        before_write=GraphStage("stamp", "stamping", stamp),
        progress=lambda *c: calls.append(c),
    )
    assert seen["records"] == ["bn"]
    written = onnx.load(path)
    assert written.doc_string == "stamped"
    assert report.op_counts == op_counts(written)
    assert list(report.timings)[-3:] == ["stamp", "write", "total"]
    steps = [c[0] for c in calls]
    assert steps[-2:] == ["stamping", "writing"]
    assert [c[1] for c in calls] == list(range(len(calls)))
    assert_matches_keras(path, model, image_feed("image", (6, 6, 2)))


def test_failing_before_write_stage_writes_nothing(tmp_path, model):
    def fail(folded, records):
        raise ExportError("stage refused")

    with pytest.raises(ExportError, match="stage refused"):
        export_float(model, tmp_path / "m.onnx", before_write=GraphStage("x", "x", fail))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry", ["facade", "package", "compose"])
def test_every_export_entry_point_takes_int8(tmp_path, entry):
    """``bnexport.export`` is the composed function whether it is bound to the package."""
    import importlib

    package = importlib.import_module("bnexport.export")  # binds bnexport.export to it
    function = {
        "facade": bnexport._resolve("export"),
        "package": package,
        "compose": composed_export,
    }[entry]
    calibration = np.zeros((2, 6, 6, 2), np.float32)
    with pytest.raises(ExportError, match="int8= needs dtype='float32'"):
        function(object(), tmp_path / "m.onnx", dtype="float16", int8=calibration)
    with pytest.raises(ExportError, match="int8= needs fused_norm='onnx'"):
        function(object(), tmp_path / "m.onnx", fused_norm="plugin", int8=calibration)
    assert list(tmp_path.iterdir()) == []


def test_public_export_signature_lists_every_option():
    import inspect

    params = inspect.signature(composed_export).parameters
    exporter = inspect.signature(export_float).parameters
    assert set(params) == (set(exporter) - {"before_write"}) | {"int8"}
    assert params["opset"].default == 17 and params["int8"].default is None
