"""The non-VNNI int16 pair-saturation rule, a graph's exposure to it, and the load-time warning.

References are independent: a pure-Python loop of ``vpmaddubsw`` + ``vpmaddwd`` for the
dot product, and Q/DQ graphs built here by hand with known int8 weights.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnexport.runtime import Session
from bnexport.runtime.cpu_features import ENV_VAR
from bnexport.runtime.int8_kernels import (
    SAFE_WEIGHT_MAX,
    load_time_warning,
    saturating_dot,
    saturation_risk,
)


def _vpmaddubsw_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row · column with int16-saturated pair sums, one element at a time (Python ints)."""
    rows, k = a.shape
    out = np.zeros((rows, w.shape[1]), np.int64)
    for r in range(rows):
        for m in range(w.shape[1]):
            total = 0
            for j in range(0, k, 2):
                pair = int(a[r, j]) * int(w[j, m])
                if j + 1 < k:
                    pair += int(a[r, j + 1]) * int(w[j + 1, m])
                total += max(-32768, min(32767, pair))
            out[r, m] = total
    return out


@pytest.mark.parametrize("k", [1, 7, 32])
def test_saturating_dot_matches_the_instruction_rule(k):
    rng = np.random.default_rng(k)
    a = rng.integers(0, 256, (40, k))
    w = rng.integers(-128, 128, (k, 6))
    w[:2, 0] = 127  # a pair that must saturate when the activations are large
    a[0, :2] = 255
    expected = _vpmaddubsw_dot(a, w)
    got = saturating_dot(a, w, max_elements=64)  # small chunks: the loop over rows runs
    np.testing.assert_array_equal(got, expected)
    if k > 1:
        assert got[0, 0] < int(a[0] @ w[:, 0])  # saturated: below the exact sum


def test_weights_up_to_64_never_saturate():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 33))
    a[:, :] = np.where(rng.random(a.shape) < 0.5, 255, a)  # many worst-case activations
    w = rng.integers(-SAFE_WEIGHT_MAX, SAFE_WEIGHT_MAX + 1, (33, 5))
    w[:, 0] = SAFE_WEIGHT_MAX  # 255·64·2 = 32,640 fits int16
    np.testing.assert_array_equal(saturating_dot(a, w), a @ w)
    w[0, 1] = w[1, 1] = SAFE_WEIGHT_MAX + 1  # 255·65·2 = 33,150 does not
    a[:, :2] = 255
    assert (saturating_dot(a, w)[:, 1] < (a @ w)[:, 1]).all()


def qdq_matmul(w_q: np.ndarray, *, activation: int = TensorProto.INT8) -> onnx.ModelProto:
    """``y = DQ(Q(x)) @ DQ(w_q)`` for ``x: float32[N, K]``, int8 weights ``w_q [K, M]``."""
    k, m = w_q.shape
    zero = np.zeros((), np.int8 if activation == TensorProto.INT8 else np.uint8)
    inits = [
        numpy_helper.from_array(np.asarray(0.05, np.float32), "xs"),
        numpy_helper.from_array(zero, "xz"),
        numpy_helper.from_array(w_q.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(m, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(m, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(peak: int) -> np.ndarray:
    w = np.random.default_rng(3).integers(-peak, peak + 1, (16, 4))
    w[0, 0] = peak
    return w


def test_risk_reads_the_graph_weights():
    risky = saturation_risk(qdq_matmul(_weights(127)))
    assert risky.may_saturate and risky.nodes == {"fc": 127} and risky.checked == 1
    safe = saturation_risk(qdq_matmul(_weights(64), activation=TensorProto.UINT8))
    assert not safe.may_saturate and safe.max_abs_weight == 64 and safe.checked == 1
    float_graph = onnx.load_from_string(qdq_matmul(_weights(127)).SerializeToString())
    del float_graph.graph.node[:3]  # no Q/DQ left: nothing is an int8 kernel
    assert saturation_risk(float_graph).checked == 0


@pytest.mark.parametrize(
    "override, peak, warns", [("novnni", 127, True), ("novnni", 64, False), ("vnni", 127, False)]
)
def test_load_time_warning_needs_both_cpu_and_weights(monkeypatch, override, peak, warns):
    monkeypatch.setenv(ENV_VAR, override)
    message = load_time_warning(qdq_matmul(_weights(peak)))
    assert (message is not None) is warns
    if warns:
        assert "VNNI" in message and "'fc'" in message and "--target cpu" in message


def test_session_logs_one_warning_line(monkeypatch, tmp_path, caplog):
    path = tmp_path / "q.onnx"
    onnx.save(qdq_matmul(_weights(127)), path)
    monkeypatch.setenv(ENV_VAR, "novnni")
    with caplog.at_level(logging.WARNING, logger="bnexport.int8"):
        sess = Session(path)
    (record,) = [r for r in caplog.records if r.name == "bnexport.int8"]
    assert str(path) in record.getMessage() and "\n" not in record.getMessage()
    assert sess.int8_warning is not None
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    assert sess.run(x)["y"].shape == (3, 4)  # a warning, not a refusal
    caplog.clear()
    monkeypatch.setenv(ENV_VAR, "vnni")
    with caplog.at_level(logging.WARNING, logger="bnexport.int8"):
        assert Session(path).int8_warning is None
    assert not [r for r in caplog.records if r.name == "bnexport.int8"]


def test_run_cli_prints_the_warning_once(tmp_path):
    """A fresh process: what a user of ``bnexport run`` sees on stderr (no log setup)."""
    onnx.save(qdq_matmul(_weights(127)), tmp_path / "q.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 16), np.float32))
    env = {**os.environ, ENV_VAR: "novnni"}
    argv = [sys.executable, "-m", "bnexport", "run", "q.onnx", "--input", "x.npy"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "int8 kernels can saturate" in line]
    assert len(lines) == 1 and lines[0].startswith("q.onnx: this CPU")
    assert "y: float32[2, 4]" in proc.stdout


def test_serve_logs_the_warning_as_one_json_line(monkeypatch):
    """``bnexport serve`` configures its JSON log lines; the load-time warning is one of them."""
    import io
    import json

    from bnexport.runtime.int8_kernels import LOGGER, warn_if_saturating
    from bnexport.serve.logs import configure_logging

    touched = [logging.getLogger(n) for n in ("bnexport.serve", "uvicorn", "uvicorn.error")]
    touched.append(LOGGER)
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in touched]
    stream = io.StringIO()
    monkeypatch.setenv(ENV_VAR, "novnni")
    try:
        configure_logging(stream=stream)
        assert warn_if_saturating(qdq_matmul(_weights(127)), "resnet/1") is not None
    finally:  # leave logging as other tests expect it
        for lg, (handlers, propagate, level) in zip(touched, saved, strict=True):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "bnexport.int8" and entry["level"] == "warning"
    assert entry["event"].startswith("resnet/1: this CPU")
