"""``bnexport.export(model, path, int8=calibration)``: export -> fold -> quantize in one call."""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from support import run_ort

import bnexport
from bnexport.errors import CalibrationError, ExportError


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = bnexport.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, name="fc")(x)
    x = bnexport.BatchNormalization(name="bn_fc")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial BN statistics
        if isinstance(layer, bnexport.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


def _images(n, seed):
    return np.random.default_rng(seed).normal(0, 1, (n, 8, 8, 1)).astype(np.float32)


def test_export_int8_writes_quantized_graph_close_to_keras(tmp_path, model):
    report = bnexport.export(model, tmp_path / "m.int8.onnx", int8=_images(64, 1))
    q = report.int8
    assert q is not None and q.bn_folded == 2  # the exporter's fold records
    assert len(q.quantized_nodes) == 3  # conv, fc, logits
    assert "Conv" in q.quantized_nodes.values()
    assert q.tensorrt_ready
    ops = [n.op_type for n in onnx.load(tmp_path / "m.int8.onnx").graph.node]
    assert "QuantizeLinear" in ops and "BatchNormalization" not in ops
    assert report.op_counts.get("DequantizeLinear", 0) > 0  # the report describes the int8 file
    x = _images(32, 2)
    # the graph's own numbers (Q/DQ as float): the TensorRT form is exact on onnxruntime's
    # kernels only where they cannot saturate (tests/quantize/test_verdict.py)
    (got,) = run_ort(tmp_path / "m.int8.onnx", {"image": x})  # optimizations off
    ref = model(x, training=False).numpy()
    # int8 vs Keras float32: NMSE <= 1 % (SQNR >= 20 dB) and >= 90 % same top-1 class
    nmse = float(np.sum((got - ref) ** 2) / np.sum(ref**2))
    assert nmse <= 0.01, nmse
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9
    assert report.to_dict()["int8"]["method"] == "minmax"


def test_export_int8_bad_calibration_or_options_write_nothing(tmp_path, model):
    with pytest.raises(CalibrationError, match="'image'"):
        bnexport.export(model, tmp_path / "a.onnx", int8=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ExportError, match="dtype='float32'"):
        bnexport.export(model, tmp_path / "b.onnx", dtype="float16", int8=_images(4, 1))
    assert list(tmp_path.iterdir()) == []
