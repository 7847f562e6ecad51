"""The main job end to end: train, recalibrate, save, export, parity (a short run)."""

from __future__ import annotations

import keras
import numpy as np
import onnx

from bnexport.cli.main import main
from bnexport.data.digits import load_digits


def test_digits_split_is_seeded_and_scaled():
    a, b = load_digits(seed=3), load_digits(seed=3)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.x_train.shape[1:] == (8, 8, 1) and a.x_train.dtype == np.float32
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    assert len(a.y_train) + len(a.y_test) == 1797


def test_quickstart_cli_writes_verified_artifacts(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out-dir", str(out), "--epochs", "3"]) == 0
    text = capsys.readouterr().out
    assert "parity: PASS" in text
    assert "4 BN: 4 folded forward" in text

    # the saved model and the ONNX graph agree on held-out digits, and classify them
    data = load_digits()
    model = keras.saving.load_model(out / "digits.keras")
    graph = onnx.load(out / "digits.onnx")
    ops = [n.op_type for n in graph.graph.node]
    # every BN folded: no BatchNormalization or per-channel Mul/Add left; the emitter writes
    # each Dense as one Gemm with its bias inside
    assert "BatchNormalization" not in ops and "Mul" not in ops and "Add" not in ops
    assert ops.count("Gemm") == 2, ops
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "digits.onnx"), providers=["CPUExecutionProvider"])
    logits_onnx = sess.run(None, {sess.get_inputs()[0].name: data.x_test})[0]
    logits_keras = np.asarray(model(data.x_test, training=False))
    np.testing.assert_allclose(logits_onnx, logits_keras, rtol=1e-4, atol=1e-4)
    accuracy = float((logits_onnx.argmax(-1) == data.y_test).mean())
    assert accuracy > 0.85, accuracy  # recalibrated statistics: ~0.97 after 3 epochs
    assert (out / "parity.html").read_text().startswith("<!DOCTYPE html")
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind
