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
from bnexport.quantize.kernel_emulation import EmulatedSession, conv_path, emulated_model
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
    """Element by element, as the kernels walk ``K``: taps ``(ki, kj)`` outer, channels
    inner, a pair every two ``K`` (across taps when the channel count is odd), int16-
    saturated pair sums of the +128-shifted activations (padding holds the zero point),
    then the exact zero-point term and the scales."""
    xq = np.clip(np.rint(x / X_SCALE), -128, 127).astype(np.int64)
    n, c, h, wd = xq.shape
    m = w_q.shape[0]
    a = np.full((n, c, h + 2, wd + 2), 128, np.int64)  # shifted zero point 0 + 128
    a[:, :, 1:-1, 1:-1] = xq + 128
    out = np.zeros((n, m, h, wd))
    for b in range(n):
        for o in range(m):
            for i in range(h):
                for j in range(wd):
                    terms = [
                        int(a[b, ch, i + ki, j + kj]) * int(w_q[o, ch, ki, kj])
                        for ki in range(3)
                        for kj in range(3)
                        for ch in range(c)
                    ]
                    terms += [0] * (len(terms) % 2)
                    acc = sum(
                        max(-32768, min(32767, terms[t] + terms[t + 1]))
                        for t in range(0, len(terms), 2)
                    )
                    acc -= 128 * int(w_q[o].sum())
                    out[b, o, i, j] = acc * X_SCALE * W_SCALE + bias[o]
    return out


@pytest.mark.parametrize(
    "channels, filters, peak",
    [
        (5, 2, 127),  # im2col QGEMM, odd C: pairs span taps
        (1, 2, 127),  # grayscale stem: pairs of neighbouring pixels
        (8, 16, 127),  # ConvSym: pairs of channels within a tap
        (5, 2, 64),  # 7-bit weights: nothing can saturate
    ],
)
def test_conv_matches_the_loop_reference(channels, filters, peak):
    rng = np.random.default_rng(peak + channels)
    w_q = rng.integers(-peak, peak + 1, (filters, channels, 3, 3))
    w_q[0] = peak  # same-sign neighbours everywhere: saturate when peak > 64
    bias = rng.normal(0, 0.1, filters)
    x = rng.uniform(-1.0, 2.5, (2, channels, 5, 5)).astype(np.float32)
    model = _qdq_conv(w_q, bias)
    got = EmulatedSession(model).run(None, {"x": x})[0]
    expected = _loop_reference(x, w_q, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    semantics = make_session(model, optimize=False).run(None, {"x": x})[0]
    if peak == 64:  # nothing can saturate: the Q/DQ graph's own numbers (float32 rounding)
        np.testing.assert_allclose(got, semantics, rtol=0, atol=1e-4)
    else:
        assert np.abs(got - semantics).max() > 0.1  # the saturation is visible


@pytest.mark.parametrize(
    "group, cin, cout, path",
    [
        (1, 1, 16, "qgemm"),  # grayscale stem
        (1, 3, 32, "qgemm"),  # RGB stem
        (1, 16, 8, "qgemm"),  # fewer than 16 output channels
        (1, 16, 24, "convsym"),  # a multiple of 8: packed to 32 with zero filters
        (1, 16, 32, "convsym"),
        (1, 6, 32, "qgemm"),  # input channels not a multiple of 4
        (32, 1, 1, "depthwise"),
        (2, 8, 16, "qgemm"),  # grouped, not depthwise
    ],
)
def test_conv_path_follows_mlas_rule(group, cin, cout, path):
    """``MlasConvSymPackWSize`` with the AVX2 dispatch: C % 4 == 0, M % 8 == 0, M >= 16."""
    assert conv_path(group, cin, cout) == path


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


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 NCHW convolution, 3×3, pad 1 (the NumPy side of the model below)."""
    h, wd = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(
        np.einsum("nchw,mc->nmhw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
        for i in range(3)
        for j in range(3)
    )
    return out + b[None, :, None, None]


def _trained_digits_cnn(data, seed: int = 1) -> onnx.ModelProto:
    """image [N,8,8,1] -> Conv 1→16 -> Relu -> Conv 16→32 -> Relu -> MaxPool -> Gemm.

    Trained without a framework: the stem's filters are the 8 leading principal
    components of the training images' 3×3 patches and their negatives (smooth, same-sign
    neighbours, like a trained stem), the second conv is random, the classifier is ridge
    regression on the pooled features (test accuracy ~98 %).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(data.x_train, np.float64).transpose(0, 3, 1, 2)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    patches = patches.reshape(-1, 9)[rng.choice(len(x) * 64, 4000, replace=False)]
    _, _, vt = np.linalg.svd(patches - patches.mean(0), full_matrices=False)
    w0 = np.concatenate([vt[:8], -vt[:8]]).reshape(16, 1, 3, 3) * 2.0
    b0 = np.full(16, -0.1)
    w1 = rng.normal(0, 1 / 12, (32, 16, 3, 3))
    b1 = np.zeros(32)
    h = np.maximum(_conv3x3(np.maximum(_conv3x3(x, w0, b0), 0), w1, b1), 0)
    feats = h.reshape(len(x), 32, 4, 2, 4, 2).max(axis=(3, 5)).reshape(len(x), -1)
    fb = np.c_[feats, np.ones(len(feats))]
    target = np.eye(10)[data.y_train] * 2 - 1
    w2 = np.linalg.solve(fb.T @ fb + np.eye(fb.shape[1]), fb.T @ target)  # ridge
    weights = {"w0": w0, "b0": b0, "w1": w1, "b1": b1, "w2": w2[:-1], "b2": w2[-1]}
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w0", "b0"], ["c0"], name="conv0", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["p1"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


#: the three Q/DQ forms of issue 17's table: TensorRT form, u8 + 8-bit, u8 + 7-bit weights
FORMS = {
    "tensorrt": {},
    "cpu-full-range": {"target": "cpu", "full_range_weights": True},
    "cpu-7bit": {"target": "cpu"},
}


def _agreement(session, x: np.ndarray, fp32: np.ndarray) -> float:
    return float(np.mean(np.asarray(session.run(None, {"image": x})[0]).argmax(1) == fp32))


def _emulated_table(fp32_model, tmp_path, data) -> dict[str, tuple[float, float, dict]]:
    """``{form: (Q/DQ-as-float agreement, emulated non-VNNI agreement, layer stats)}`` on
    the test split."""
    x = np.asarray(data.x_test, np.float32)
    fp32 = np.asarray(make_session(fp32_model).run(None, {"image": x})[0]).argmax(1)
    calib = np.asarray(data.x_train[:256], np.float32)
    onnx.save(fp32_model, tmp_path / "fp32.onnx")
    table = {}
    for form, kwargs in FORMS.items():
        out = tmp_path / f"{form}.onnx"
        bnexport.quantize(tmp_path / "fp32.onnx", out, calib, keep_below_target=True, **kwargs)
        q = onnx.load(out)
        emulated = EmulatedSession(q)
        table[form] = (
            _agreement(make_session(q, optimize=False), x, fp32),
            _agreement(emulated, x, fp32),
            emulated.layer_stats,
        )
    return table


def test_emulation_reproduces_the_measured_non_vnni_order(tmp_path):
    """Issue 17, on an AVX2-only EPYC with onnxruntime 1.32: TensorRT form 55 %, u8 with
    8-bit weights 92.5 %, u8 with 7-bit weights 99.4 % top-1 agreement, while every Q/DQ
    graph itself agrees >= 99 %. The emulation must show the same order on a trained CNN
    with a grayscale stem: a strong drop, a smaller one, none. (The old emulation ran a
    one-channel stem as if it were depthwise and predicted no drop at all.)"""
    from bnexport.data.digits import load_digits

    data = load_digits(seed=0)
    table = _emulated_table(_trained_digits_cnn(data), tmp_path, data)
    quant = {form: q for form, (q, _, _) in table.items()}
    emu = {form: e for form, (_, e, _) in table.items()}
    stem = {form: stats["conv0"].fraction for form, (_, _, stats) in table.items()}
    assert min(quant.values()) >= 0.99, table  # the quantization itself is fine
    assert emu["tensorrt"] <= 0.90, table  # strong drop (measured 55 %)
    assert emu["tensorrt"] < emu["cpu-full-range"] < quant["cpu-full-range"], table  # some
    assert emu["cpu-7bit"] == quant["cpu-7bit"], table  # 7-bit weights cannot saturate
    # the stem: a dark pixel is 128 after the s8 -> u8 shift, 0 with u8 activations
    assert stem["tensorrt"] > stem["cpu-full-range"] > 0 == stem["cpu-7bit"], stem
    assert all(st.changed == 0 for st in table["cpu-7bit"][2].values())


@pytest.mark.slow  # trains the quickstart's Keras CNN (~25 s on 2 cores)
def test_emulation_reproduces_the_quickstart_figure(tmp_path):
    """The quickstart's digits CNN (same layout and training as when issue 17 was filed)
    printed INT8 accuracy 61.28 % on the EPYC for the TensorRT form; the emulation gives
    ~62 % where this host's VNNI kernels and the Q/DQ graph give ~99 %."""
    from bnexport.data.digits import load_digits
    from bnexport.layers.recalibrate import recalibrate
    from bnexport.quickstart import train_digits

    data = load_digits(seed=0)
    model, _ = train_digits(data, epochs=10, seed=0)  # the quickstart's defaults
    recalibrate(model, data.x_train, batch_size=64)
    bnexport.export(model, tmp_path / "digits.onnx")
    table = _emulated_table(onnx.load(tmp_path / "digits.onnx"), tmp_path, data)
    assert table["tensorrt"][0] >= 0.99 and table["tensorrt"][1] <= 0.75, table
    assert table["cpu-7bit"][1] == table["cpu-7bit"][0], table
