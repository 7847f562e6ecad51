"""Backward folds: a BN on a graph input (or after a non-linear op) into the next linear op."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_graphs import assert_same_outputs, bn_params, build, op_counts

from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report

DTYPES = [np.float32, np.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
@pytest.mark.parametrize("padding", ["pads=[0,0,0,0]", 'auto_pad="VALID"', 'auto_pad="SAME_UPPER"'])
def test_bn_on_graph_input_folds_into_unpadded_conv(dtype, bias, group, padding):
    rng = np.random.default_rng(11)
    c_in, c_out = 4, 6
    groups = c_in if group == "depthwise" else group
    c_out = c_in * 2 if group == "depthwise" else c_out
    kernel = 1 if "SAME" in padding else 3  # SAME with a 1x1 kernel pads nothing
    inits = {
        "W": rng.normal(0, 0.5, (c_out, c_in // groups, kernel, kernel)),
        **bn_params(rng, c_in),
    }
    inputs = "n, W, B" if bias else "n, W"
    if bias:
        inits["B"] = rng.normal(0, 1, c_out)
    stride = 2 if kernel == 1 else 1
    out = 5 if kernel == 3 else 4
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,{c_in},7,7] x) => (T[N,{c_out},{out},{out}] y) {{
          n = BatchNormalization(x, g, b, m, v)
          y = Conv<{padding}, group={groups}, strides=[{stride},{stride}]>({inputs})
        }}""",
        inits,
        dtype,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert [r.action for r in records] == ["folded_backward"]
    assert "forward: BN input is a graph input" in records[0].reason
    x = rng.normal(0, 1, (2, c_in, 7, 7)).astype(dtype)
    assert_same_outputs(model, folded, {"x": x}, dtype)


@pytest.mark.parametrize("padding", ["pads=[1,1,1,1]", 'auto_pad="SAME_LOWER"'])
def test_padded_conv_refuses_backward_fold(padding):
    rng = np.random.default_rng(12)
    inits = {"W": rng.normal(0, 0.5, (5, 3, 3, 3)), **bn_params(rng, 3)}
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x) => (T[N,5,6,6] y) {{
          n = BatchNormalization(x, g, b, m, v)
          y = Conv<{padding}>(n, W)
        }}""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"BatchNormalization": 1, "Conv": 1}
    assert records[0].action == "fused"
    assert "nonzero padding (backward fold inexact)" in records[0].reason
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)})


def test_padded_conv_folds_a_pure_scale():
    """With zero shift, padding does not matter: a per-channel Mul folds into a padded Conv."""
    rng = np.random.default_rng(13)
    inits = {"W": rng.normal(0, 0.5, (5, 3, 3, 3)), "k": rng.uniform(0.5, 2, (3, 1, 1))}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x) => (T[N,5,6,6] y) {
          n = Mul(x, k)
          y = Conv<pads=[1,1,1,1]>(n, W)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert records[0].action == "folded_backward"
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "with_c"),
    [
        (0, 0, 1.0, 1.0, True),
        (0, 1, 0.5, 2.0, True),
        (1, 0, 1.0, 1.0, False),
        (1, 1, 2.0, 0.0, True),
    ],
)
def test_gemm_backward(dtype, trans_a, trans_b, alpha, beta, with_c):
    rng = np.random.default_rng(14)
    m, k, n = 4, 5, 3
    p = bn_params(rng, k)
    inits = {"W": rng.normal(0, 0.5, (n, k) if trans_b else (k, n))}
    if trans_a:  # A is [K, M]: the normalized axis is 0 — a Mul/Add chain on [K, 1]
        scale = p["g"] / np.sqrt(p["v"] + 1e-5)
        inits.update(s=scale.reshape(k, 1), t=(p["b"] - p["m"] * scale).reshape(k, 1))
        norm, shape = "a = Mul(x, s)\n n = Add(a, t)", f"[{k},{m}]"
    else:
        inits.update(p)
        norm, shape = "n = BatchNormalization(x, g, b, m, v)", f"[{m},{k}]"
    inputs = "n, W, C" if with_c else "n, W"
    if with_c:
        inits["C"] = rng.normal(0, 1, (n,))
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T{shape} x) => (T[{m},{n}] y) {{
          {norm}
          y = Gemm<transA={trans_a}, transB={trans_b}, alpha={alpha}, beta={beta}>({inputs})
        }}""",
        inits,
        dtype,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Gemm": 1}
    assert records[0].action == "folded_backward"
    x = rng.normal(0, 1, (k, m) if trans_a else (m, k)).astype(dtype)
    assert_same_outputs(model, folded, {"x": x}, dtype)


@pytest.mark.parametrize("with_bias_add", [True, False])
def test_matmul_backward_rank3(with_bias_add):
    rng = np.random.default_rng(15)
    inits = {"W": rng.normal(0, 0.5, (5, 3)), **bn_params(rng, 5), "bias": rng.normal(0, 1, 3)}
    scale = inits["g"] / np.sqrt(inits["v"] + 1e-5)
    inits = {"W": inits["W"], "bias": inits["bias"], "s": scale,
             "t": inits["b"] - inits["m"] * scale}  # fmt: skip
    tail = "h = MatMul(n, W)\n y = Add(h, bias)" if with_bias_add else "y = MatMul(n, W)"
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,4,5] x) => (T[N,4,3] y) {{
          r = Relu(x)
          a = Mul(r, s)
          n = Add(a, t)
          {tail}
        }}""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Relu": 1, "MatMul": 1, "Add": 1}
    assert records[0].action == "folded_backward"
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (2, 4, 5)).astype(np.float32)})


def test_bn_with_two_consumers_becomes_one_node():
    rng = np.random.default_rng(16)
    inits = {"W1": rng.normal(0, 0.5, (4, 3, 1, 1)), "W2": rng.normal(0, 0.5, (2, 3, 1, 1))}
    inits.update(bn_params(rng, 3))
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,5,5] x) => (T[N,4,5,5] y1, T[N,2,5,5] y2) {
          r = Relu(x)
          n = BatchNormalization(r, g, b, m, v)
          y1 = Conv(n, W1)
          y2 = Conv(n, W2)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Relu": 1, "BatchNormalization": 1, "Conv": 2}
    assert records[0].action == "fused"
    assert "BN output has another consumer" in records[0].reason
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (2, 3, 5, 5)).astype(np.float32)})
