"""Held-out INT8 checks on a trained digits CNN (the quickstart's model, trained here):
top-1 agreement with float32 >= 99 % and test accuracy within 1 point, through the API and
the CLI, on both branches of the CPU override. Accuracies are recomputed with NumPy from
the graphs' own outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnexport
from bnexport.cli.main import main
from bnexport.quantize.compare import make_session
from bnexport.quantize.verdict import kernel_session
from bnexport.runtime.cpu_features import ENV_VAR

pytestmark = pytest.mark.slow  # trains a CNN (~25 s on 2 cores) before the checks


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from bnexport.data.digits import load_digits
    from bnexport.layers.recalibrate import recalibrate
    from bnexport.quickstart import train_digits

    data = load_digits(seed=0)
    model, _ = train_digits(data, epochs=6, seed=0)
    recalibrate(model, data.x_train, batch_size=64)
    folder = tmp_path_factory.mktemp("digits")
    bnexport.export(model, folder / "digits.onnx")
    pick = np.random.default_rng(0).permutation(len(data.x_train))[:256]
    calib = np.asarray(data.x_train[pick], np.float32)
    return data, folder, calib, model


def _predict(session, data) -> np.ndarray:
    feed = {"image": np.asarray(data.x_test, np.float32)}
    return np.asarray(session.run(None, feed)[0]).argmax(1)


def _check(data, fp32_path, int8_path) -> None:
    fp32 = _predict(make_session(fp32_path), data)
    kernels, _, _ = kernel_session(onnx.load(int8_path))  # this CPU (or its emulation)
    for session in (kernels, make_session(int8_path, optimize=False)):
        int8 = _predict(session, data)
        assert np.mean(int8 == fp32) >= 0.99
        accuracy = (np.mean(fp32 == data.y_test), np.mean(int8 == data.y_test))
        assert abs(accuracy[0] - accuracy[1]) <= 0.01, accuracy


def test_api_cpu_target_held_out(digits, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "novnni")  # the branch CI may not have
    data, folder, calib, _ = digits
    report = bnexport.quantize(
        folder / "digits.onnx", tmp_path / "q.onnx", calib, validation=data.x_test, target="cpu"
    )
    assert report.verdict_target == 0.99 and report.top1_agreement >= 0.99
    _check(data, folder / "digits.onnx", tmp_path / "q.onnx")


def test_cli_held_out(digits, tmp_path, capsys):
    data, folder, calib, _ = digits
    np.save(tmp_path / "c.npy", calib)
    np.save(tmp_path / "v.npy", np.asarray(data.x_test, np.float32))
    out = tmp_path / "q.onnx"
    argv = ["quantize", str(folder / "digits.onnx"), "-o", str(out), "--target", "cpu",
            "--calibration", str(tmp_path / "c.npy"),
            "--validation", str(tmp_path / "v.npy")]  # fmt: skip
    assert main(argv) == 0
    assert "verdict: ok" in " ".join(capsys.readouterr().out.split())
    _check(data, folder / "digits.onnx", out)


@pytest.mark.parametrize("override", ["vnni", "novnni"])
@pytest.mark.parametrize("target", ["tensorrt", "cpu"])
def test_api_every_target_and_branch(digits, tmp_path, monkeypatch, override, target):
    """The TensorRT form is only checked where its kernels cannot saturate (vnni)."""
    monkeypatch.setenv(ENV_VAR, override)
    data, folder, calib, _ = digits
    report = bnexport.quantize(
        folder / "digits.onnx", tmp_path / "q.onnx", calib, validation=data.x_test, target=target
    )
    assert report.top1_agreement >= 0.99
    if target == "cpu" or override == "vnni":
        _check(data, folder / "digits.onnx", tmp_path / "q.onnx")


def test_parity_reports_both_errors(digits, tmp_path, monkeypatch, caplog):
    """parity on the TensorRT form under the non-VNNI branch: the quantization error beside
    the onnxruntime result, and the one load-time warning line (weights beyond ±64)."""
    import logging

    from bnexport.parity.check import check_parity

    monkeypatch.setenv(ENV_VAR, "novnni")
    data, folder, calib, model = digits
    int8 = tmp_path / "t.onnx"
    bnexport.quantize(folder / "digits.onnx", int8, calib, validation=data.x_test)
    x = np.asarray(data.x_test[:200], np.float32)
    with caplog.at_level(logging.WARNING, logger="bnexport.int8"):
        report = check_parity(model, int8, inputs=x)
    assert len([r for r in caplog.records if r.name == "bnexport.int8"]) == 1
    (b,) = report.backends
    keras_top1 = np.asarray(model(x, training=False)).argmax(1)
    qdq = _predict_x(make_session(int8, optimize=False), x)
    assert b.quantization_top1 == pytest.approx(np.mean(qdq == keras_top1))
    assert b.to_dict()["quantization_top1"] == b.quantization_top1
    assert "quantization error alone" in " ".join(str(p) for p in _table_text(report).split())


def _predict_x(session, x):
    return np.asarray(session.run(None, {"image": x})[0]).argmax(1)


def _table_text(report) -> str:
    import io

    from rich.console import Console

    text = io.StringIO()
    Console(file=text, width=200).print(report.table())
    return text.getvalue()
