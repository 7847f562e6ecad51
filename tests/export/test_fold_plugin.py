"""fused_norm="plugin": one bnexport::FusedNorm node, activations absorbed, training-mode BN.

onnxruntime cannot run FusedNorm, so the folded graph is evaluated by ONNX's NumPy
evaluator with FusedNorm from ``bnexport_plugins.fused_norm.reference`` and compared
with onnxruntime on the original graph (float32 tolerance of ``onnx_graphs``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bnexport_plugins.fused_norm import spec
from onnx_graphs import assert_same_outputs, bn_params, build, op_counts

from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report

ACTIVATIONS = {
    "none": ("y = Identity(n)", {}),
    "relu": ("y = Relu(n)", {}),
    "relu6": ("y = Clip(n, zero, six)", {"zero": np.array(0.0), "six": np.array(6.0)}),
    "leaky_relu": ("y = LeakyRelu<alpha=0.2>(n)", {}),
    "sigmoid": ("y = Sigmoid(n)", {}),
    "silu": ("s = Sigmoid(n)\n y = Mul(n, s)", {}),
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_bn_plus_activation_is_one_fused_norm(act):
    rng = np.random.default_rng(30)
    body, extra = ACTIVATIONS[act]
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,4,3,3] x) => (T[N,4,3,3] y) {{
          n = BatchNormalization<epsilon=1e-3>(x, g, b, m, v)
          {body}
        }}""",
        {**bn_params(rng, 4), **extra},
    )
    folded, records = fold_batchnorm_with_report(model, fused_norm="plugin")
    expected_ops = {"FusedNorm": 1, "Identity": 1} if act == "none" else {"FusedNorm": 1}
    assert op_counts(folded) == expected_ops
    node = next(n for n in folded.graph.node if n.op_type == "FusedNorm")
    assert node.domain == spec.DOMAIN
    attrs = _attrs(node)
    assert attrs["activation"].decode() == act and attrs["mode"].decode() == "affine"
    assert attrs["axis"] == 1 and attrs["plugin_namespace"].decode() == spec.PLUGIN_NAMESPACE
    assert set(attrs) == {*spec.ATTRIBUTE_DEFAULTS, "plugin_namespace"}
    if act == "leaky_relu":
        assert attrs["alpha"] == pytest.approx(0.2)
    inits = {i.name: i for i in folded.graph.initializer}
    assert all(inits[name].data_type == onnx.TensorProto.FLOAT for name in node.input[1:])
    assert {o.domain: o.version for o in folded.opset_import}[spec.DOMAIN] == spec.OPSET_VERSION
    assert records[0].action == "fused" and records[0].target == node.name
    x = rng.normal(0, 2, (2, 4, 3, 3)).astype(np.float32)
    assert_same_outputs(model, folded, {"x": x}, numpy_eval=True)


def test_forward_fold_still_wins_in_plugin_mode():
    rng = np.random.default_rng(31)
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,5,5] x) => (T[N,4,3,3] y) {
          c = Conv(x, W)
          n = BatchNormalization(c, g, b, m, v)
          y = Relu(n)
        }""",
        {"W": rng.normal(0, 0.5, (4, 3, 3, 3)), **bn_params(rng, 4)},
    )
    folded, records = fold_batchnorm_with_report(model, fused_norm="plugin")
    assert op_counts(folded) == {"Conv": 1, "Relu": 1}
    assert spec.DOMAIN not in {o.domain for o in folded.opset_import}
    assert records[0].action == "folded_forward"


def test_multi_consumer_bn_on_nhwc_axis():
    rng = np.random.default_rng(32)
    inits = {"k1": rng.uniform(0.5, 2, 4), "k2": rng.normal(0, 1, 4)}
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,3,4] x) => (T[N,3,3,4] y1, T[N,3,3,4] y2) {
          a = Mul(x, k1)
          n = Add(a, k2)
          y1 = Relu(n)
          y2 = Sigmoid(n)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model, fused_norm="plugin")
    assert op_counts(folded) == {"FusedNorm": 1, "Relu": 1, "Sigmoid": 1}
    node = next(n for n in folded.graph.node if n.op_type == "FusedNorm")
    assert _attrs(node)["axis"] == 3 and _attrs(node)["activation"].decode() == "none"
    assert "another consumer" in records[0].reason
    x = rng.normal(0, 1, (2, 3, 3, 4)).astype(np.float32)
    assert_same_outputs(model, folded, {"x": x}, numpy_eval=True)


@pytest.mark.parametrize("stats_used", [True, False])
def test_training_mode_bn_maps_onto_batch_stats(stats_used):
    rng = np.random.default_rng(33)
    sig = "(T[N,3,4,4] y, T[3] rm, T[3] rv)" if stats_used else "(T[N,3,4,4] y)"
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,4,4] x) => {sig} {{
          y, rm, rv = BatchNormalization<training_mode=1, momentum=0.8, epsilon=1e-3>(x, g, b, m, v)
        }}""",
        bn_params(rng, 3),
    )
    kept, records = fold_batchnorm_with_report(model, fused_norm="onnx")
    assert op_counts(kept) == {"BatchNormalization": 1} and records[0].action == "kept"
    folded, records = fold_batchnorm_with_report(model, fused_norm="plugin")
    node = next(n for n in folded.graph.node if n.op_type == "FusedNorm")
    attrs = _attrs(node)
    assert attrs["mode"].decode() == "batch_stats"
    assert attrs["epsilon"] == pytest.approx(1e-3)
    assert attrs["return_stats"] == int(stats_used)
    assert len(node.output) == (3 if stats_used else 1)
    assert records[0].action == "fused" and "batch_stats" in records[0].reason
    x = rng.normal(1.0, 2.0, (4, 3, 4, 4)).astype(np.float32)
    assert_same_outputs(model, folded, {"x": x}, numpy_eval=True)


def test_training_mode_bn_with_non_constant_gamma_is_kept():
    rng = np.random.default_rng(34)
    params = bn_params(rng, 3)
    del params["g"]
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,4,4] x, T[3] g) => (T[N,3,4,4] y) {
          y, rm, rv = BatchNormalization<training_mode=1>(x, g, b, m, v)
        }""",
        params,
    )
    folded, records = fold_batchnorm_with_report(model, fused_norm="plugin")
    assert op_counts(folded) == {"BatchNormalization": 1}
    assert records[0].action == "kept" and "not constant" in records[0].reason


def test_float16_graph_gets_float32_scale_and_shift():
    rng = np.random.default_rng(35)
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,4,3,3] x) => (T[N,4,3,3] y) {
          n = BatchNormalization(x, g, b, m, v)
          y = Relu(n)
        }""",
        bn_params(rng, 4),
        np.float16,
    )
    folded, _ = fold_batchnorm_with_report(model, fused_norm="plugin")
    node = next(n for n in folded.graph.node if n.op_type == "FusedNorm")
    inits = {i.name: i.data_type for i in folded.graph.initializer}
    assert [inits[name] for name in node.input[1:]] == [onnx.TensorProto.FLOAT] * 2
    x = rng.normal(0, 2, (2, 4, 3, 3)).astype(np.float16)
    assert_same_outputs(model, folded, {"x": x}, np.float16, numpy_eval=True)
