"""float16 export (fold first, then convert; overflow policy) and the plugin FusedNorm mode."""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from export_models import (  # noqa: E402
    TOL,
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    op_counts,
    randomize_biases,
    randomize_bn,
    run_onnx,
)

import bnexport  # noqa: E402
from bnexport.errors import ExportError  # noqa: E402

L = keras.layers
F16 = onnx.TensorProto.FLOAT16
F32 = onnx.TensorProto.FLOAT


def _cnn():
    inp = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.BatchNormalization(name="bn_pre")(x)  # cannot fold: one node
    x = L.ReLU(name="r2")(x)
    x = L.DepthwiseConv2D(3, name="dw")(x)
    x = L.BatchNormalization(name="bn_dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(4, name="d")(x)
    model = keras.Model(inp, out)
    randomize_bn(model)
    randomize_biases(model)
    return model


def _elem_types(model: onnx.ModelProto, which: str) -> list[int]:
    return [v.type.tensor_type.elem_type for v in getattr(model.graph, which)]


def test_float16_export_folds_then_converts(tmp_path):
    model = _cnn()
    path = tmp_path / "f16.onnx"
    report = bnexport.export(model, path, dtype="float16")
    onnx_model = onnx.load(path)
    assert report.dtype == "float16" and report.io_dtype == "float16"
    assert _elem_types(onnx_model, "input") == [F16]
    assert _elem_types(onnx_model, "output") == [F16]
    assert {i.data_type for i in onnx_model.graph.initializer} <= {F16, onnx.TensorProto.INT64}
    assert {r.name: r.action for r in report.records} == {
        "bn1": "folded_forward",
        "bn_pre": "fused",
        "bn_dw": "folded_forward",
    }
    assert len(bn_derived_nodes(path)) == 1
    assert report.verify.passed and report.verify.rtol == TOL["float16"][0]
    onnx.checker.check_model(onnx_model, full_check=True)
    assert_matches_keras(path, model, image_feed("image", (12, 12, 3)), dtype="float16")


def test_float16_with_float32_io(tmp_path):
    model = _cnn()
    path = tmp_path / "f16io.onnx"
    report = bnexport.export(model, path, dtype="float16", io_dtype="float32")
    onnx_model = onnx.load(path)
    assert _elem_types(onnx_model, "input") == [F32]
    assert _elem_types(onnx_model, "output") == [F32]
    assert report.inputs == {"image": [None, 12, 12, 3]}
    assert_matches_keras(path, model, image_feed("image", (12, 12, 3)), dtype="float16")


def _overflow_model():
    """Dense + BN whose folded weights are ~1e5 (> float16's 65504), fed inputs ~1e-4."""
    inp = keras.Input((6,), name="x")
    x = L.Dense(5, name="dense")(inp)
    x = L.BatchNormalization(name="bn_big")(x)
    out = L.Dense(3, name="head")(x)
    model = keras.Model(inp, out)
    randomize_biases(model)
    bn = model.get_layer("bn_big")
    bn.gamma.assign(np.full(5, 1.0e5, np.float32))
    bn.moving_variance.assign(np.full(5, 0.5, np.float32))
    model.get_layer("dense").kernel.assign(
        np.random.default_rng(0).uniform(1.0, 2.0, (6, 5)).astype(np.float32)
    )
    model.get_layer("dense").bias.assign(np.zeros(5, np.float32))
    model.get_layer("head").kernel.assign(
        np.random.default_rng(1).uniform(-1e-3, 1e-3, (5, 3)).astype(np.float32)
    )
    return model


def test_float16_overflow_keeps_op_in_float32(tmp_path):
    model = _overflow_model()
    path = tmp_path / "ovf.onnx"
    report = bnexport.export(model, path, dtype="float16", verify=False)
    assert len(report.float32_nodes) == 1
    onnx_model = onnx.load(path)
    f32_inits = [i for i in onnx_model.graph.initializer if i.data_type == F32]
    assert f32_inits, "the overflowing folded weight must stay float32"
    assert all(
        np.isfinite(onnx.numpy_helper.to_array(i)).all() for i in onnx_model.graph.initializer
    )
    assert op_counts(path)["Cast"] >= 2
    feeds = {"x": np.random.default_rng(2).uniform(-1e-4, 1e-4, (4, 6)).astype(np.float32)}
    (got,) = run_onnx(path, feeds)
    ref = model(feeds["x"], training=False).numpy()
    assert np.isfinite(got).all()
    rtol, atol = TOL["float16"]
    assert np.max(np.abs(got - ref)) <= rtol * np.max(np.abs(ref)) + atol


def test_float16_overflow_error_names_the_layer(tmp_path):
    model = _overflow_model()
    path = tmp_path / "ovf.onnx"
    with pytest.raises(ExportError, match="bn_big"):
        bnexport.export(model, path, dtype="float16", keep_float16_overflow="error", verify=False)
    assert not path.exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_plugin_mode_emits_fused_norm_node(tmp_path, dtype):
    import bnexport_plugins.fused_norm.ort_cpu  # noqa: F401 - must import, not skip

    model = _cnn()
    path = tmp_path / f"plugin_{dtype}.onnx"
    report = bnexport.export(model, path, fused_norm="plugin", dtype=dtype)
    onnx_model = onnx.load(path)
    fused = [n for n in onnx_model.graph.node if n.op_type == "FusedNorm"]
    assert len(fused) == 1 and fused[0].domain == "bnexport"
    attrs = {a.name: a for a in fused[0].attribute}
    assert attrs["activation"].s == b"relu"  # the following ReLU is absorbed
    assert {r.name: r.action for r in report.records}["bn_pre"] == "fused"
    assert report.verify.passed and "FusedNorm" in report.verify.runtime
    assert_matches_keras(path, model, image_feed("image", (12, 12, 3)), dtype=dtype)
