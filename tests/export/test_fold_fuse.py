"""Unfoldable normalizations become one standard ONNX node; whole graphs from other exporters."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_graphs import assert_same_outputs, bn_params, build, op_counts

from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bn_between_relus_becomes_one_epsilon_zero_bn(dtype):
    rng = np.random.default_rng(20)
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,4,3,3] x) => (T[N,4,3,3] y) {
          r = Relu(x)
          n = BatchNormalization<epsilon=1e-2>(r, g, b, m, v)
          y = Relu(n)
        }""",
        bn_params(rng, 4),
        dtype,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Relu": 2, "BatchNormalization": 1}
    bn = next(n for n in folded.graph.node if n.op_type == "BatchNormalization")
    assert [(a.name, a.f) for a in bn.attribute] == [("epsilon", 0.0)]
    assert records[0].action == "fused" and records[0].target == bn.name
    assert_same_outputs(model, folded, {"x": rng.normal(0, 2, (2, 4, 3, 3)).astype(dtype)}, dtype)


def test_default_epsilon_is_the_spec_default():
    """No epsilon attribute means 1e-5 — with var ~ 1e-5 a wrong default shows up at once."""
    rng = np.random.default_rng(21)
    params = bn_params(rng, 3)
    params["v"] = np.full(3, 2e-5)
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3] x) => (T[N,3] y) {
          r = Relu(x)
          y = BatchNormalization(r, g, b, m, v)
        }""",
        params,
    )
    folded, _ = fold_batchnorm_with_report(model)
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (4, 3)).astype(np.float32)})


def test_nhwc_chain_collapses_to_mul_add():
    """Channel-last Mul,Mul,Sub,Add after a Transpose: no foldable neighbour, no 1-node op."""
    rng = np.random.default_rng(22)
    c = 5
    inits = {k: rng.uniform(0.5, 1.5, c) for k in ("k1", "k2", "k3", "k4")}
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,{c},3,3] x) => (T[N,3,3,{c}] y) {{
          t = Transpose<perm=[0,2,3,1]>(x)
          a = Mul(t, k1)
          a2 = Mul(a, k2)
          s = Sub(a2, k3)
          y = Add(s, k4)
        }}""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Transpose": 1, "Mul": 1, "Add": 1}
    assert records[0].action == "fused"
    assert "channel axis 3 is not 1" in records[0].reason
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (2, c, 3, 3)).astype(np.float32)})


def test_lone_bias_add_and_scalar_ops_are_left_alone():
    rng = np.random.default_rng(23)
    inits = {"bias": rng.normal(0, 1, 4), "half": np.array(0.5), "one": np.array([1.0])}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,4] x) => (T[N,4] y) {
          r = Relu(x)
          a = Add(r, bias)
          r2 = Relu(a)
          h = Mul(r2, half)
          y = Add(h, one)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert records == []
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Add", "Relu", "Mul", "Add"]
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (3, 4)).astype(np.float32)})


def test_pytorch_style_nchw_resnet_block():
    """Conv-BN-Relu x2 + residual + GAP + Gemm(transB), node names as torch.onnx writes them."""
    rng = np.random.default_rng(24)
    inits = {
        "conv1_weight": rng.normal(0, 0.3, (8, 3, 3, 3)),
        "conv2_weight": rng.normal(0, 0.3, (8, 8, 3, 3)),
        "down_weight": rng.normal(0, 0.3, (8, 3, 1, 1)),
        "fc_weight": rng.normal(0, 0.3, (10, 8)),
        "fc_bias": rng.normal(0, 1, 10),
    }
    for prefix in ("bn1", "bn2", "bnd"):
        inits.update(bn_params(rng, 8, prefix))
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        torch_jit (T[batch,3,8,8] input) => (T[batch,10] logits) {
          c1 = Conv <pads=[1,1,1,1], strides=[2,2]> (input, conv1_weight)
          b1 = BatchNormalization (c1, bn1g, bn1b, bn1m, bn1v)
          r1 = Relu (b1)
          c2 = Conv <pads=[1,1,1,1]> (r1, conv2_weight)
          b2 = BatchNormalization (c2, bn2g, bn2b, bn2m, bn2v)
          cd = Conv <strides=[2,2]> (input, down_weight)
          bd = BatchNormalization (cd, bndg, bndb, bndm, bndv)
          s = Add (b2, bd)
          r2 = Relu (s)
          p = GlobalAveragePool (r2)
          f = Flatten (p)
          logits = Gemm <alpha=1.0, beta=1.0, transB=1> (f, fc_weight, fc_bias)
        }""",
        inits,
    )
    torch_names = [
        "/conv1/Conv", "/bn1/BatchNormalization", "/relu/Relu", "/conv2/Conv",
        "/bn2/BatchNormalization", "/down/Conv", "/bnd/BatchNormalization", "/Add",
        "/relu_1/Relu", "/pool/GlobalAveragePool", "/Flatten", "/fc/Gemm",
    ]  # fmt: skip
    for node, name in zip(model.graph.node, torch_names, strict=True):
        node.name = name
    folded, records = fold_batchnorm_with_report(model)
    assert "BatchNormalization" not in op_counts(folded)
    assert op_counts(folded)["Conv"] == 3
    assert [(r.name, r.action, r.target) for r in records] == [
        ("/bn1/BatchNormalization", "folded_forward", "/conv1/Conv"),
        ("/bn2/BatchNormalization", "folded_forward", "/conv2/Conv"),
        ("/bnd/BatchNormalization", "folded_forward", "/down/Conv"),
    ]
    assert_same_outputs(model, folded, {"input": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)})


def test_bn_params_not_constant_is_kept():
    rng = np.random.default_rng(25)
    p = bn_params(rng, 3)
    del p["m"]
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3] x, T[3] m) => (T[N,3] y) {
          y = BatchNormalization(x, g, b, m, v)
        }""",
        p,
    )
    folded, records = fold_batchnorm_with_report(model, names={"y": "my_bn"})
    assert op_counts(folded) == {"BatchNormalization": 1}
    assert records[0].name == "my_bn" and records[0].action == "kept"
    assert "'input_mean' is not a constant initializer" in records[0].reason


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nhwc_chain_folds_through_a_transpose(direction):
    """NHWC exporters: Conv → Transpose → Mul/Add, or Mul/Add → Transpose → Conv (no pads)."""
    rng = np.random.default_rng(26)
    c = 4
    inits = {"W": rng.normal(0, 0.5, (c, c, 3, 3)), "k1": rng.uniform(0.5, 2, c),
             "k2": rng.normal(0, 1, c)}  # fmt: skip
    if direction == "forward":
        body = """c = Conv(x, W)
          t = Transpose<perm=[0,2,3,1]>(c)
          a = Mul(t, k1)
          y = Add(a, k2)"""
        sig, shape = f"(T[N,{c},6,6] x) => (T[N,4,4,{c}] y)", (2, c, 6, 6)
    else:
        body = """a = Mul(x, k1)
          n = Add(a, k2)
          t = Transpose<perm=[0,3,1,2]>(n)
          y = Conv(t, W)"""
        sig, shape = f"(T[N,6,6,{c}] x) => (T[N,{c},4,4] y)", (2, 6, 6, c)
    model = build(f'<ir_version: 8, opset_import: ["" : 17]>\n g {sig} {{ {body} }}', inits)
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1, "Transpose": 1}
    assert records[0].action == f"folded_{direction}"
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, shape).astype(np.float32)})


@pytest.mark.parametrize("fused_norm", ["onnx", "plugin"])
def test_lone_layer_scale_mul_that_cannot_fold_stays_one_mul(fused_norm):
    rng = np.random.default_rng(27)
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,4,2,2] x) => (T[N,4,2,2] y) {
          r = Relu(x)
          y = Mul(r, k)
        }""",
        {"k": rng.uniform(0.5, 2, (4, 1, 1))},
    )
    folded, records = fold_batchnorm_with_report(model, fused_norm=fused_norm)
    assert op_counts(folded) == {"Relu": 1, "Mul": 1}
    assert [(r.action, r.target) for r in records] == [("kept", None)]
    assert_same_outputs(model, folded, {"x": rng.normal(0, 1, (2, 4, 2, 2)).astype(np.float32)})
