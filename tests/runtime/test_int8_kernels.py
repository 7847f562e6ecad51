"""The non-VNNI int16 pair-saturation rule, a graph's exposure to it, and the load-time warning.

References are independent: a pure-Python loop of ``vpmaddubsw`` + ``vpmaddwd`` for the
dot product, and Q/DQ graphs built here by hand with known int8 weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnexport.runtime import Session
from bnexport.runtime.cpu_features import ENV_VAR, cpu_int8_features
from bnexport.runtime.int8_kernels import (
    PRECISION_MODE_KEY,
    SAFE_WEIGHT_MAX,
    X86_MACHINES,
    SaturationStats,
    apply_precision_mode,
    load_time_warning,
    saturating_dot,
    saturation_risk,
)

X86 = platform.machine().lower() in X86_MACHINES
needs_x86 = pytest.mark.needs(
    "x86",
    unverified=f"the exact u8u8 mode ({PRECISION_MODE_KEY}: onnxruntime's x86 builds only)",
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
    stats = SaturationStats()
    got = saturating_dot(a, w, max_elements=64, stats=stats)  # small chunks: rows loop
    np.testing.assert_array_equal(got, expected)
    exact = a @ w
    assert stats.accumulators == exact.size and stats.max_exact == np.abs(exact).max()
    assert stats.changed == np.count_nonzero(expected != exact)
    assert stats.max_lost == np.abs(expected - exact).max()
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
    lines = [line for line in proc.stderr.splitlines() if "int8 kernels" in line]
    assert len(lines) == 1 and lines[0].startswith("q.onnx: this CPU")
    assert (f"{PRECISION_MODE_KEY}=1" in lines[0]) is X86  # x86: the exact u8u8 mode
    assert "y: float32[2, 4]" in proc.stdout


def _config_entry(sess: Session) -> str | None:
    options = sess._impl.session.get_session_options()  # what onnxruntime was given
    try:
        return options.get_session_config_entry(PRECISION_MODE_KEY)
    except RuntimeError:  # "does not have configuration with key"
        return None


@pytest.mark.parametrize(
    "override, peak, machine, wanted",
    [
        ("novnni", 127, "x86_64", True),
        ("novnni", 64, "x86_64", False),  # 7-bit weights cannot saturate: full speed
        ("vnni", 127, "x86_64", False),  # int32 dot products: nothing to fix
        ("novnni", 127, "aarch64", False),  # the option is x86-only in onnxruntime
    ],
)
def test_precision_options_only_where_the_kernels_saturate(
    monkeypatch, override, peak, machine, wanted
):
    import onnxruntime as ort

    monkeypatch.setenv(ENV_VAR, override)
    features = dataclasses.replace(cpu_int8_features(), machine=machine)
    model = qdq_matmul(_weights(peak))
    options, on = apply_precision_mode(model, None, features)
    assert on is wanted and (options is not None) is wanted
    if wanted:
        assert options.get_session_config_entry(PRECISION_MODE_KEY) == "1"
    mine = ort.SessionOptions()  # the caller's options: the entry is added to them
    assert apply_precision_mode(model, mine, features) == (mine, wanted)
    opted_out = ort.SessionOptions()
    opted_out.add_session_config_entry(PRECISION_MODE_KEY, "0")  # the caller's choice stays
    assert apply_precision_mode(model, opted_out, features) == (opted_out, False)
    assert opted_out.get_session_config_entry(PRECISION_MODE_KEY) == "0"
    float_graph = onnx.load_from_string(model.SerializeToString())
    del float_graph.graph.node[:3]
    assert apply_precision_mode(float_graph, None, features) == (None, False)


@needs_x86
def test_session_sets_precision_mode_under_novnni(monkeypatch, tmp_path):
    """Under ``novnni`` the session asks onnxruntime for its exact u8u8 mode, and the
    numbers are the Q/DQ graph's own on any x86 host; the emulated u8s8 kernels, what
    a non-VNNI CPU runs without it, are visibly off on the same feed."""
    import onnxruntime as ort

    from bnexport.quantize.kernel_emulation import EmulatedSession
    from bnexport.runtime import make_session

    model = qdq_matmul(_weights(127))
    onnx.save(model, tmp_path / "q.onnx")
    x = np.random.default_rng(1).uniform(-6.0, 6.0, (64, 16)).astype(np.float32)  # |x_q| ~ 120
    semantics = make_session(model, optimize=False).run(None, {"x": x})[0]
    monkeypatch.setenv(ENV_VAR, "novnni")
    sess = Session(tmp_path / "q.onnx")
    assert _config_entry(sess) == "1"
    assert f"{PRECISION_MODE_KEY}=1" in sess.int8_warning and "'fc'" in sess.int8_warning
    # exact integer sums, float32 scaling: a few float32 ulps of |y| <= ~30
    np.testing.assert_allclose(sess.run(x)["y"], semantics, rtol=0, atol=1e-4)
    predicted = EmulatedSession(model).run(None, {"x": x})[0]
    assert np.abs(predicted - semantics).max() > 1.0  # what the option avoids
    threads = ort.SessionOptions()  # e.g. what `bnexport serve` passes: the entry is added
    threads.intra_op_num_threads = 1
    assert _config_entry(Session(tmp_path / "q.onnx", session_options=threads)) == "1"
    fast = ort.SessionOptions()
    fast.add_session_config_entry(PRECISION_MODE_KEY, "0")  # the caller opts out
    user = Session(tmp_path / "q.onnx", session_options=fast)
    assert _config_entry(user) == "0" and "can saturate" in user.int8_warning
    monkeypatch.setenv(ENV_VAR, "vnni")
    assert _config_entry(Session(tmp_path / "q.onnx")) is None


@needs_x86
def test_onnxruntime_converts_the_saturating_weights_to_uint8(tmp_path):
    """What the option does in onnxruntime's graph: the int8 weight of a layer beyond
    ±64 becomes uint8 (``w ^ 0x80``, u8u8 kernels); a 7-bit one stays int8."""
    import onnxruntime as ort

    for peak, weight_type in ((127, TensorProto.UINT8), (64, TensorProto.INT8)):
        model = qdq_matmul(_weights(peak))
        options = ort.SessionOptions()
        options.add_session_config_entry(PRECISION_MODE_KEY, "1")  # also for the 7-bit one
        options.optimized_model_filepath = str(tmp_path / f"opt{peak}.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(tmp_path / f"opt{peak}.onnx")
        (weight,) = [t for t in optimized.graph.initializer if list(t.dims) == [16, 4]]
        assert weight.data_type == weight_type, (peak, weight.name)


def test_serve_logs_the_warning_as_one_json_line(monkeypatch):
    """``bnexport serve`` configures its JSON log lines; the load-time warning is one of them."""
    import io
    import json

    from bnexport.runtime.int8_kernels import LOGGER, warn_if_saturating
    from bnexport.serve.core.logs import configure_logging

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
