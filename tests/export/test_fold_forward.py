"""Forward folds: BN / Mul-Add after Conv, ConvTranspose, Gemm, MatMul (fp32 and fp16)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_graphs import assert_same_outputs, bn_params, build, op_counts

from bnexport.export.passes.fold_batchnorm import fold_batchnorm, fold_batchnorm_with_report

DTYPES = [np.float32, np.float16]


def _x(rng, shape, dtype):
    return rng.normal(0, 1, shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
def test_conv_bn(dtype, bias, group):
    rng = np.random.default_rng(1)
    c_in, c_out = 4, 8
    groups = c_in if group == "depthwise" else group
    if group == "depthwise":
        c_out = c_in
    inits = {"W": rng.normal(0, 0.5, (c_out, c_in // groups, 3, 3)), **bn_params(rng, c_out)}
    conv_inputs = "x, W"
    if bias:
        inits["B"] = rng.normal(0, 1, c_out)
        conv_inputs += ", B"
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,{c_in},6,6] x) => (T[N,{c_out},6,6] y) {{
          c = Conv<pads=[1,1,1,1], group={groups}>({conv_inputs})
          y = BatchNormalization<epsilon=1e-3>(c, g, b, m, v)
        }}""",
        inits,
        dtype,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert [(r.action, r.target) for r in records] == [("folded_forward", "Conv")]
    assert_same_outputs(model, folded, {"x": _x(rng, (2, c_in, 6, 6), dtype)}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn(dtype, bias, group):
    rng = np.random.default_rng(2)
    c_in, c_out = 4, 6
    inits = {"W": rng.normal(0, 0.5, (c_in, c_out // group, 3, 3)), **bn_params(rng, c_out)}
    conv_inputs = "x, W, B" if bias else "x, W"
    if bias:
        inits["B"] = rng.normal(0, 1, c_out)
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,{c_in},5,5] x) => (T[N,{c_out},11,11] y) {{
          c = ConvTranspose<strides=[2,2], group={group}>({conv_inputs})
          y = BatchNormalization(c, g, b, m, v)
        }}""",
        inits,
        dtype,
    )
    folded = fold_batchnorm(model)
    assert op_counts(folded) == {"ConvTranspose": 1}
    assert_same_outputs(model, folded, {"x": _x(rng, (2, c_in, 5, 5), dtype)}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    ("alpha", "beta", "c_shape"),
    [(1.0, 1.0, (6,)), (0.5, 2.0, (6,)), (1.5, 0.0, (6,)), (1.0, 0.5, (3, 6)), (1.0, 1.0, None)],
)
def test_gemm_bn(dtype, trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(3)
    k, n = 5, 6
    inits = {"W": rng.normal(0, 0.5, (n, k) if trans_b else (k, n)), **bn_params(rng, n)}
    gemm_inputs = "x, W"
    if c_shape is not None:
        inits["C"] = rng.normal(0, 1, c_shape)
        gemm_inputs += ", C"
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[3,{k}] x) => (T[3,{n}] y) {{
          h = Gemm<transB={trans_b}, alpha={alpha}, beta={beta}>({gemm_inputs})
          y = BatchNormalization(h, g, b, m, v)
        }}""",
        inits,
        dtype,
    )
    folded = fold_batchnorm(model)
    assert op_counts(folded) == {"Gemm": 1}
    assert_same_outputs(model, folded, {"x": _x(rng, (3, k), dtype)}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_rank2_becomes_gemm(dtype):
    rng = np.random.default_rng(4)
    inits = {"W": rng.normal(0, 0.5, (5, 6)), **bn_params(rng, 6)}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,5] x) => (T[N,6] y) {
          h = MatMul(x, W)
          y = BatchNormalization(h, g, b, m, v)
        }""",
        inits,
        dtype,
    )
    folded = fold_batchnorm(model)
    assert op_counts(folded) == {"Gemm": 1}
    assert_same_outputs(model, folded, {"x": _x(rng, (4, 5), dtype)}, dtype)


def test_matmul_rank3_tf2onnx_dense_bias_and_keras3_bn():
    """tf2onnx Dense on a sequence: MatMul, bias Add, then Keras 3 BN as Mul, Add."""
    rng = np.random.default_rng(5)
    p = bn_params(rng, 6)
    scale = p["g"] / np.sqrt(p["v"] + 1e-3)
    inits = {
        "W": rng.normal(0, 0.5, (5, 6)),
        "bias": rng.normal(0, 1, 6),
        "mul_c": scale,
        "add_c": p["b"] - p["m"] * scale,
    }
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,7,5] x) => (T[N,7,6] y) {
          h = MatMul(x, W)
          hb = Add(h, bias)
          s = Mul(hb, mul_c)
          y = Add(s, add_c)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model, names={"s": "bn_layer"})
    assert op_counts(folded) == {"MatMul": 1, "Add": 1}
    assert [(r.name, r.action) for r in records] == [("bn_layer", "folded_forward")]
    assert_same_outputs(model, folded, {"x": _x(rng, (2, 7, 5), np.float32)})


@pytest.mark.parametrize("chain", ["mul_add", "mul_mul_sub_add", "sub_div", "rsub_mul"])
def test_conv_affine_chain_from_tf2onnx(chain):
    """Keras 3 BN reaches ONNX as a constant Mul/Add chain; it folds like a BN node."""
    rng = np.random.default_rng(6)
    c = 4
    p = bn_params(rng, c)
    inv = 1.0 / np.sqrt(p["v"] + 1e-3)
    bodies = {
        "mul_add": ("a = Mul(c, k1)\n y = Add(a, k2)", {"k1": p["g"] * inv,
                                                     "k2": p["b"] - p["m"] * p["g"] * inv}),
        "mul_mul_sub_add": (
            "a = Mul(c, k1)\n a2 = Mul(a, k2)\n s = Sub(a2, k3)\n y = Add(s, k4)",
            {"k1": inv, "k2": p["g"], "k3": p["m"] * inv * p["g"], "k4": p["b"]},
        ),
        "sub_div": ("a = Sub(c, k1)\n y = Div(a, k2)", {"k1": p["m"], "k2": np.sqrt(p["v"])}),
        "rsub_mul": ("a = Sub(k1, c)\n y = Mul(a, k2)", {"k1": p["m"], "k2": -p["g"] * inv}),
    }  # fmt: skip
    body, consts = bodies[chain]
    inits = {"W": rng.normal(0, 0.5, (c, 3, 3, 3))}
    inits.update({k: v.reshape(c, 1, 1) for k, v in consts.items()})
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x) => (T[N,{c},4,4] y) {{
          c = Conv(x, W)
          {body}
        }}""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert [r.action for r in records] == ["folded_forward"]
    assert_same_outputs(model, folded, {"x": _x(rng, (2, 3, 6, 6), np.float32)})


def test_bn_as_graph_output_keeps_its_name():
    rng = np.random.default_rng(7)
    inits = {"W": rng.normal(0, 0.5, (4, 3, 1, 1)), **bn_params(rng, 4)}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,4,4] x) => (T[N,4,4,4] bn_out, T[N,4,4,4] r) {
          c = Conv(x, W)
          bn_out = BatchNormalization(c, g, b, m, v)
          r = Relu(bn_out)
        }""",
        inits,
    )
    folded = fold_batchnorm(model)
    assert op_counts(folded) == {"Conv": 1, "Relu": 1}
    assert folded.graph.node[0].output[0] == "bn_out"
    assert_same_outputs(model, folded, {"x": _x(rng, (2, 3, 4, 4), np.float32)})


def test_shared_weight_is_cloned_per_fold():
    rng = np.random.default_rng(8)
    inits = {"W": rng.normal(0, 0.5, (4, 3, 3, 3))}
    inits.update(bn_params(rng, 4, "p"))
    inits.update(bn_params(rng, 4, "q"))
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x) => (T[N,4,4,4] y1, T[N,4,4,4] y2, T[N,4,4,4] y3) {
          c1 = Conv(x, W)
          y1 = BatchNormalization(c1, pg, pb, pm, pv)
          c2 = Conv(x, W)
          y2 = BatchNormalization(c2, qg, qb, qm, qv)
          y3 = Conv(x, W)
        }""",
        inits,
    )
    folded = fold_batchnorm(model)
    assert op_counts(folded) == {"Conv": 3}
    weights = [n.input[1] for n in folded.graph.node]
    assert len(set(weights)) == 3 and weights[2] == "W"
    assert_same_outputs(model, folded, {"x": _x(rng, (2, 3, 6, 6), np.float32)})


def test_conv_output_with_second_consumer_is_not_folded_forward():
    rng = np.random.default_rng(9)
    inits = {"W": rng.normal(0, 0.5, (4, 3, 3, 3)), **bn_params(rng, 4)}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x) => (T[N,4,4,4] y, T[N,4,4,4] r) {
          c = Conv(x, W)
          y = BatchNormalization(c, g, b, m, v)
          r = Relu(c)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1, "Relu": 1, "BatchNormalization": 1}
    assert records[0].action == "fused"
    assert "output has another consumer" in records[0].reason
    assert_same_outputs(model, folded, {"x": _x(rng, (2, 3, 6, 6), np.float32)})


def test_non_constant_weight_is_refused_with_reason():
    rng = np.random.default_rng(10)
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x, T[4,3,3,3] w) => (T[N,4,4,4] y) {
          c = Conv(x, w)
          y = BatchNormalization(c, g, b, m, v)
        }""",
        bn_params(rng, 4),
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1, "BatchNormalization": 1}
    assert "is not a constant initializer" in records[0].reason
    feeds = {"x": _x(rng, (2, 3, 6, 6), np.float32), "w": _x(rng, (4, 3, 3, 3), np.float32)}
    assert_same_outputs(model, folded, feeds)


def test_two_stacked_bns_merge_and_each_gets_a_record():
    rng = np.random.default_rng(11)
    inits = {"W": rng.normal(0, 0.5, (4, 3, 3, 3))}
    inits.update(bn_params(rng, 4, "p"))
    inits.update(bn_params(rng, 4, "q"))
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,6,6] x) => (T[N,4,4,4] y) {
          c = Conv(x, W)
          n = BatchNormalization(c, pg, pb, pm, pv)
          y = BatchNormalization(n, qg, qb, qm, qv)
        }""",
        inits,
    )
    model.graph.node[0].name = "conv"
    folded, records = fold_batchnorm_with_report(model, names={"n": "bn_a", "y": "bn_b"})
    assert op_counts(folded) == {"Conv": 1}
    assert [(r.name, r.action, r.target) for r in records] == [
        ("bn_a", "folded_forward", "conv"),
        ("bn_b", "folded_forward", "conv"),
    ]
    assert_same_outputs(model, folded, {"x": _x(rng, (2, 3, 6, 6), np.float32)})


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_scale_after_matmul_folds_without_a_zero_bias(dtype):
    """A per-channel Mul (no shift) folds into W alone: no Gemm, no bias Add of zeros."""
    rng = np.random.default_rng(12)
    inits = {"W": rng.normal(0, 0.5, (5, 6)), "s": rng.uniform(0.5, 2.0, 6)}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,5] x) => (T[N,6] y) {
          h = MatMul(x, W)
          y = Mul(h, s)
        }""",
        inits,
        dtype,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"MatMul": 1}
    assert [r.action for r in records] == ["folded_forward"]
    assert len(folded.graph.initializer) == 1
    assert_same_outputs(model, folded, {"x": _x(rng, (4, 5), dtype)}, dtype)
