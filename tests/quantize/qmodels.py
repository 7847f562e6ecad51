"""Small ONNX CNNs with BatchNormalization, and NumPy references of their fp32 and QDQ math.

``small_cnn``: x[N,3,8,8] -> Conv3x3(3->8, pad 1, no bias) -> BN -> Relu -> Conv3x3(8->16,
pad 1, bias) -> BN -> Relu -> GlobalAveragePool -> Flatten -> Gemm(16->10, transB) ->
logits[N,10]. Every BN can fold forward into its Conv.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-5


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {
        "w0": rng.normal(0, 0.4, (8, 3, 3, 3)),
        "w1": rng.normal(0, 0.15, (16, 8, 3, 3)),
        "b1": rng.normal(0, 0.1, 16),
        "wf": rng.normal(0, 0.4, (10, 16)),
        "bf": rng.normal(0, 0.1, 10),
    }
    for i, c in ((0, 8), (1, 16)):
        p[f"g{i}"] = rng.uniform(0.5, 1.5, c)
        p[f"be{i}"] = rng.normal(0, 0.2, c)
        p[f"m{i}"] = rng.normal(0, 0.3, c)
        p[f"v{i}"] = rng.uniform(0.3, 2.0, c)
    return {k: v.astype(np.float32) for k, v in p.items()}


def small_cnn(seed: int = 0, *, unfoldable_bn: bool = False) -> onnx.ModelProto:
    """The model above; ``unfoldable_bn`` adds a BN on the input (before a padded Conv)."""
    p = _params(seed)
    nodes = []
    x = "x"
    if unfoldable_bn:
        for name, value in (
            ("gi", np.array([1.5, 0.5, 2.0])),
            ("bi", np.array([0.1, -0.2, 0.3])),
            ("mi", np.array([0.2, 0.0, -0.1])),
            ("vi", np.array([1.0, 2.0, 0.5])),
        ):
            p[name] = value.astype(np.float32)
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                ["x", "gi", "bi", "mi", "vi"],
                ["xn"],
                name="bn_in",
                epsilon=EPS,
            )
        )
        x = "xn"
    nodes += [
        helper.make_node("Conv", [x, "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c0", "g0", "be0", "m0", "v0"], ["n0"], name="bn0", epsilon=EPS
        ),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1", epsilon=EPS
        ),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in p.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------- NumPy references (float64)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """3x3 convolution, stride 1, zero padding 1, NCHW, float64."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack(
        [xp[:, :, i : i + h, j : j + wd] for i in range(3) for j in range(3)], axis=2
    )  # N, C, 9, H, W
    out = np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], c, 9))
    return out if b is None else out + b[None, :, None, None]


def folded_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Conv weights/bias with each BN folded in: W' = W·γ/σ, b' = (b − μ)·γ/σ + β."""
    p = {k: v.astype(np.float64) for k, v in _params(seed).items()}
    out = {"wf": p["wf"], "bf": p["bf"]}
    for i, bias in ((0, np.zeros(8)), (1, p["b1"])):
        scale = p[f"g{i}"] / np.sqrt(p[f"v{i}"] + EPS)
        out[f"w{i}"] = p[f"w{i}"] * scale[:, None, None, None]
        out[f"b{i}"] = (bias - p[f"m{i}"]) * scale + p[f"be{i}"]
    return out


def fp32_reference(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every quantized tensor of the float graph: x, c0, r0, c1, fl, logits."""
    p = folded_params(seed)
    t = {"x": x.astype(np.float64)}
    t["c0"] = conv2d(t["x"], p["w0"], p["b0"])
    t["r0"] = np.maximum(t["c0"], 0)
    t["c1"] = conv2d(t["r0"], p["w1"], p["b1"])
    t["fl"] = np.maximum(t["c1"], 0).mean(axis=(2, 3))
    t["logits"] = t["fl"] @ p["wf"].T + p["bf"]
    return t


def fake_quant(x: np.ndarray, scale: np.ndarray | float, axis: int | None = None) -> np.ndarray:
    """Symmetric int8 quantize-dequantize: clip(round(x / s), -128, 127) · s (half to even)."""
    s = np.asarray(scale, np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return np.clip(np.rint(x / s), -128, 127) * s


def qdq_reference(x: np.ndarray, calib: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The QDQ graph's math with scales computed here: activations max|t|/127 over the
    calibration set (MinMax, symmetric), weights per output channel max|W_c|/127."""
    p = folded_params(seed)
    ranges = fp32_reference(calib, seed)
    s = {k: np.abs(ranges[k]).max() / 127.0 for k in ("x", "c0", "r0", "c1", "fl", "logits")}
    ws = {k: np.abs(p[k]).reshape(p[k].shape[0], -1).max(axis=1) / 127.0 for k in ("w0", "w1")}
    ws["wf"] = np.abs(p["wf"]).max(axis=1) / 127.0
    q = {k: fake_quant(p[k], ws[k], axis=0) for k in ("w0", "w1", "wf")}
    t = {"x": fake_quant(x.astype(np.float64), s["x"])}
    c0 = fake_quant(conv2d(t["x"], q["w0"], p["b0"]), s["c0"])
    r0 = fake_quant(np.maximum(c0, 0), s["r0"])
    c1 = fake_quant(conv2d(r0, q["w1"], p["b1"]), s["c1"])
    fl = fake_quant(np.maximum(c1, 0).mean(axis=(2, 3)), s["fl"])
    logits = fake_quant(fl @ q["wf"].T + p["bf"], s["logits"])
    return {"logits": logits, "scales": s, "weight_scales": ws}


def branchy_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->8) -> Relu -> {ConvA, ConvB}(8->8) -> Add(ConvA, ConvB, r0) ->
    GlobalAveragePool -> Flatten -> Gemm(8->10): the Relu output has three consumers."""
    rng = np.random.default_rng(seed)
    weights = {
        "w0": rng.normal(0, 0.4, (8, 3, 3, 3)),
        "wa": rng.normal(0, 0.2, (8, 8, 3, 3)),
        "wb": rng.normal(0, 0.2, (8, 8, 3, 3)),
        "wf": rng.normal(0, 0.4, (10, 8)),
        "bf": rng.normal(0, 0.1, 10),
    }
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=pads),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "wa"], ["ca"], name="conv_a", pads=pads),
        helper.make_node("Conv", ["r0", "wb"], ["cb"], name="conv_b", pads=pads),
        helper.make_node("Add", ["ca", "cb"], ["s"], name="add_ab"),
        helper.make_node("Add", ["s", "r0"], ["t"], name="add_res"),
        helper.make_node("GlobalAveragePool", ["t"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
