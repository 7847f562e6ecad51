"""The NumPy emulation of non-VNNI int8 kernels, against a loop written from the rule and
against onnxruntime (with graph optimizations off where nothing can saturate; with its
real kernels where the host's features say what they must compute)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qmodels import images, small_cnn

import bnexport
from bnexport.quantize.compare import make_session
from bnexport.quantize.kernel_emulation import EmulatedSession, emulated_model
from bnexport.runtime.cpu_features import hardware_int8_features

X_SCALE, W_SCALE = 0.02, 0.01


def _qdq_conv(w_q: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """``y = Conv(DQ(Q(x)), DQ(w_q), bias)``, int8 symmetric activations, 3×3, pad 1."""
    m, c = w_q.shape[:2]
    inits = [
        numpy_helper.from_array(np.asarray(X_SCALE, np.float32), "xs"),
        numpy_helper.from_array(np.zeros((), np.int8), "xz"),
        numpy_helper.from_array(w_q.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(m, W_SCALE, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(m, np.int8), "wz"),
        numpy_helper.from_array(bias.astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _loop_reference(x: np.ndarray, w_q: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Element by element: channels of a tap padded to 4, int16-saturated pair sums of the
    +128-shifted activations, then the exact zero-point term and the scales."""
    xq = np.clip(np.rint(x / X_SCALE), -128, 127).astype(np.int64)
    n, c, h, wd = xq.shape
    m = w_q.shape[0]
    cp = c + (-c % 4)
    padded = np.full((n, cp, h + 2, wd + 2), 0, np.int64)  # shifted zero point 128 - 128
    padded[:, :c, 1:-1, 1:-1] = xq
    a = padded + 128
    wp = np.zeros((m, cp, 3, 3), np.int64)
    wp[:, :c] = w_q
    out = np.zeros((n, m, h, wd))
    for b in range(n):
        for o in range(m):
            for i in range(h):
                for j in range(wd):
                    acc = 0
                    for ki in range(3):
                        for kj in range(3):
                            for ch in range(0, cp, 2):
                                pair = int(a[b, ch, i + ki, j + kj]) * int(wp[o, ch, ki, kj])
                                pair += int(a[b, ch + 1, i + ki, j + kj]) * int(
                                    wp[o, ch + 1, ki, kj]
                                )
                                acc += max(-32768, min(32767, pair))
                    acc -= 128 * int(wp[o].sum())
                    out[b, o, i, j] = acc * X_SCALE * W_SCALE + bias[o]
    return out


@pytest.mark.parametrize("peak", [127, 64])
def test_conv_matches_the_loop_reference(peak):
    rng = np.random.default_rng(peak)
    w_q = rng.integers(-peak, peak + 1, (2, 5, 3, 3))
    w_q[0, :2] = peak  # same-sign neighbours: saturate when peak > 64
    bias = rng.normal(0, 0.1, 2)
    x = rng.uniform(-1.0, 2.5, (2, 5, 5, 5)).astype(np.float32)
    model = _qdq_conv(w_q, bias)
    got = EmulatedSession(model).run(None, {"x": x})[0]
    expected = _loop_reference(x, w_q, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    semantics = make_session(model, optimize=False).run(None, {"x": x})[0]
    if peak == 64:  # nothing can saturate: the Q/DQ graph's own numbers (float32 rounding)
        np.testing.assert_allclose(got, semantics, rtol=0, atol=1e-4)
    else:
        assert np.abs(got - semantics).max() > 0.1  # the saturation is visible


def test_emulated_graph_replaces_only_quantized_linear_nodes(tmp_path):
    onnx.save(small_cnn(), tmp_path / "m.onnx")
    bnexport.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", images(64))
    emulated, replaced = emulated_model(onnx.load(tmp_path / "q.onnx"))
    assert sorted(replaced) == ["conv0", "conv1", "fc"]
    assert [n.op_type for n in emulated.graph.node if n.domain] == ["SaturatingLinear"] * 3


@pytest.fixture(scope="module")
def cpu_graph(tmp_path_factory):
    """small_cnn quantized for CPU serving: 7-bit weights, which cannot saturate."""
    tmp = tmp_path_factory.mktemp("cpu")
    onnx.save(small_cnn(), tmp / "m.onnx")
    bnexport.quantize(tmp / "m.onnx", tmp / "q.onnx", images(64), target="cpu")
    return onnx.load(tmp / "q.onnx")


def test_emulation_without_saturation_is_the_qdq_graph(cpu_graph):
    x = images(50, seed=5)
    emu = EmulatedSession(cpu_graph).run(None, {"x": x})[0]
    semantics = make_session(cpu_graph, optimize=False).run(None, {"x": x})[0]
    lsb = float(
        next(
            numpy_helper.to_array(t)
            for t in cpu_graph.graph.initializer
            if t.name.startswith("logits") and t.name.endswith("scale")
        )
    )
    assert np.abs(emu - semantics).max() <= lsb + 1e-6  # one requantization step at most


def test_real_kernels_do_what_this_host_promises(cpu_graph, tmp_path):
    """The 7-bit graph is exact on onnxruntime's kernels on every host; the 8-bit
    TensorRT form only where int8 dot products accumulate in int32."""
    x = images(50, seed=6)
    semantics = make_session(cpu_graph, optimize=False).run(None, {"x": x})[0]
    kernels = make_session(cpu_graph).run(None, {"x": x})[0]
    scale = np.abs(semantics).max()
    assert np.abs(kernels - semantics).max() <= 0.03 * scale
    assert np.mean(kernels.argmax(1) == semantics.argmax(1)) >= 0.98
    onnx.save(small_cnn(), tmp_path / "m.onnx")
    bnexport.quantize(tmp_path / "m.onnx", tmp_path / "t.onnx", images(64))
    trt_form = onnx.load(tmp_path / "t.onnx")
    semantics = make_session(trt_form, optimize=False).run(None, {"x": x})[0]
    kernels = make_session(trt_form).run(None, {"x": x})[0]
    if hardware_int8_features().int32_dot:
        assert np.abs(kernels - semantics).max() <= 0.03 * np.abs(semantics).max()
    else:  # this host's kernels saturate: they must at least differ from the semantics
        predicted = EmulatedSession(trt_form).run(None, {"x": x})[0]
        assert np.abs(predicted - semantics).max() > 0.03 * np.abs(semantics).max()
