"""float16: folded weights that do not fit float16 never become inf; bad statistics fail loudly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import assert_same_outputs, bn_params, build, op_counts

from bnexport.errors import ExportError, FoldError
from bnexport.export.passes.fold_batchnorm import fold_batchnorm, fold_batchnorm_with_report

CONV_BN = """<ir_version: 8, opset_import: ["" : 17]>
g (T[N,3,5,5] x) => (T[N,4,3,3] y) {
  c = Conv(x, W)
  y = BatchNormalization(c, g, b, m, v)
}"""


def _huge_scale_params(rng):
    """BN with scale = γ/√(var+ε) ≈ 300: W' = W·scale exceeds 65504 where |W| > ~220."""
    params = bn_params(rng, 4)
    params["g"] = np.full(4, 3.0)
    params["v"] = np.full(4, 1e-4)
    params["m"] = np.zeros(4)
    return {"W": rng.uniform(200, 400, (4, 3, 3, 3)) * rng.choice([-1, 1], (4, 3, 3, 3)), **params}


def test_float16_overflow_keeps_conv_in_float32():
    rng = np.random.default_rng(40)
    model = build(CONV_BN, _huge_scale_params(rng), np.float16)
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Cast": 2, "Conv": 1}
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    weights = {i.name: i for i in folded.graph.initializer}
    assert weights[conv.input[1]].data_type == onnx.TensorProto.FLOAT
    assert np.abs(onnx.numpy_helper.to_array(weights[conv.input[1]])).max() > 65504
    assert records[0].action == "folded_forward"
    assert "kept in float32" in records[0].reason and "overflows float16" in records[0].reason
    # small inputs keep every intermediate of the original fp16 graph finite
    x = rng.normal(0, 1e-3, (2, 3, 5, 5)).astype(np.float16)
    assert_same_outputs(model, folded, {"x": x}, np.float16)


def test_float16_overflow_error_policy_names_the_node():
    rng = np.random.default_rng(41)
    model = build(CONV_BN, _huge_scale_params(rng), np.float16)
    model.graph.node[0].name = "stem_conv"
    with pytest.raises(FoldError, match="stem_conv: folded weight overflows float16"):
        fold_batchnorm(model, keep_float16_overflow="error")


def test_float16_fused_bn_out_of_range_runs_in_float32():
    rng = np.random.default_rng(42)
    params = bn_params(rng, 3)
    params.update(g=np.full(3, 1e3), v=np.full(3, 1e-4), m=np.zeros(3))  # scale ≈ 1e5
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,2,2] x) => (T[N,3,2,2] y) {
          r = Relu(x)
          y = BatchNormalization(r, g, b, m, v)
        }""",
        params,
        np.float16,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Relu": 1, "Cast": 2, "BatchNormalization": 1}
    assert records[0].action == "fused" and "kept in float32" in records[0].reason
    x = rng.uniform(0, 1e-2, (2, 3, 2, 2)).astype(np.float16)
    assert_same_outputs(model, folded, {"x": x}, np.float16)


def test_float16_folded_weights_stay_float16_when_they_fit():
    rng = np.random.default_rng(43)
    model = build(CONV_BN, {"W": rng.normal(0, 0.5, (4, 3, 3, 3)), **bn_params(rng, 4)}, np.float16)
    folded = fold_batchnorm(model)
    assert op_counts(folded) == {"Conv": 1}
    assert {i.data_type for i in folded.graph.initializer} == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("v", -0.5, "moving_variance is negative"), ("m", np.nan, "moving_mean has 1 non-finite")],
)
def test_bad_statistics_raise_naming_the_node(field, value, message):
    rng = np.random.default_rng(44)
    params = {"W": rng.normal(0, 0.5, (4, 3, 3, 3)), **bn_params(rng, 4)}
    params[field][2] = value
    model = build(CONV_BN, params)
    model.graph.node[1].name = "block1_bn"
    with pytest.raises(ExportError, match=f"block1_bn: {message}"):
        fold_batchnorm(model)


def test_old_opset_is_rejected():
    model = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 6)]
    )
    with pytest.raises(FoldError, match="opset >= 7"):
        fold_batchnorm(model)


def test_bad_options_are_rejected():
    model = build(CONV_BN, {"W": np.ones((4, 3, 3, 3)), **bn_params(np.random.default_rng(0), 4)})
    with pytest.raises(ValueError, match="fused_norm must be"):
        fold_batchnorm(model, fused_norm="tensorrt")
    with pytest.raises(ValueError, match="keep_float16_overflow must be"):
        fold_batchnorm(model, keep_float16_overflow="bfloat16")


def test_input_model_is_not_modified():
    rng = np.random.default_rng(45)
    model = build(CONV_BN, {"W": rng.normal(0, 0.5, (4, 3, 3, 3)), **bn_params(rng, 4)})
    before = model.SerializeToString()
    fold_batchnorm(model)
    assert model.SerializeToString() == before


def test_float16_underflow_of_a_whole_channel_keeps_float32():
    """scale ≈ 1e-6 on channel 0: its folded weights (< 2**-24) would all flush to zero."""
    rng = np.random.default_rng(46)
    params = {"W": rng.uniform(0.01, 0.02, (4, 3, 3, 3)), **bn_params(rng, 4)}
    params["g"][0], params["v"][0] = 1e-4, 1e4
    model = build(CONV_BN, params, np.float16)
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Cast": 2, "Conv": 1}
    assert "underflows float16 (slice 0" in records[0].reason
    x = rng.normal(0, 1, (2, 3, 5, 5)).astype(np.float16)
    assert_same_outputs(model, folded, {"x": x}, np.float16)


def test_float16_overflow_in_a_matmul_fold_keeps_matmul_and_bias_in_float32():
    rng = np.random.default_rng(47)
    params = {"W": rng.uniform(200, 400, (5, 3)), "s": np.full(3, 300.0), "t": np.ones(3)}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,2,5] x) => (T[N,2,3] y) {
          h = MatMul(x, W)
          a = Mul(h, s)
          y = Add(a, t)
        }""",
        params,
        np.float16,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Cast": 2, "MatMul": 1, "Add": 1}
    assert "MatMul kept in float32" in records[0].reason
    x = rng.normal(0, 1e-3, (2, 2, 5)).astype(np.float16)
    assert_same_outputs(model, folded, {"x": x}, np.float16)
