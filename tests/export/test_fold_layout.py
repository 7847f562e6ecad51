"""Layout passes: tf2onnx's Transpose / Squeeze / Reshape moved off a BN chain, then the fold.

Each graph is the pattern tf2onnx writes (BN as ``Mul``/``Add`` named in ``bn_nodes``).
After the layout pass the graph must compute the same outputs (onnxruntime, graph
optimizations disabled, float32 tolerance of ``onnx_graphs``), keep its output names,
pass the full checker, and let ``fold_batchnorm`` fold the BN away (op counts).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx_graphs import assert_same_outputs, build, op_counts

from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report
from bnexport.export.passes.layout import sink_layout_ops


def _named(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    for node, name in zip(model.graph.node, names, strict=True):
        node.name = name
    return model


BN = {"bn_mul": "bn", "bn_add": "bn"}

INPUT_BN_NHWC = """<ir_version: 8, opset_import: ["" : 13]>
g (T[N,5,5,3] x) => (T[N,4,3,3] y) {
  m = Mul(x, s)
  a = Add(m, b)
  t = Transpose<perm=[0,3,1,2]>(a)
  y = Conv(t, W)
}"""


def _input_bn(rng):
    inits = {
        "s": rng.uniform(0.5, 2.0, 3),
        "b": rng.normal(0, 1, 3),
        "W": rng.normal(0, 1, (4, 3, 3, 3)),
    }
    return _named(build(INPUT_BN_NHWC, inits), "bn_mul", "bn_add", "to_nchw", "conv")


def test_transpose_moves_in_front_of_bn_then_bn_folds_backward():
    rng = np.random.default_rng(0)
    model = _input_bn(rng)
    moved = sink_layout_ops(model, BN)
    assert [n.op_type for n in moved.graph.node] == ["Transpose", "Mul", "Add", "Conv"]
    assert moved.graph.node[0].name == "to_nchw"
    add = next(n for n in moved.graph.node if n.op_type == "Add")
    assert add.output[0] == "a"  # the BN layer's tensor keeps its name
    assert {i.name for i in moved.graph.initializer} == {"W", "bn_mul_scale_nc", "bn_add_shift_nc"}
    feeds = {"x": rng.normal(0, 1, (2, 5, 5, 3)).astype(np.float32)}
    assert_same_outputs(model, moved, feeds)

    folded, records = fold_batchnorm_with_report(moved, names=BN)
    assert op_counts(folded) == {"Transpose": 1, "Conv": 1}
    assert [(r.name, r.action) for r in records] == [("bn", "folded_backward")]
    assert_same_outputs(model, folded, feeds)


def test_nothing_moves_without_bn_nodes_or_when_transpose_is_an_output():
    rng = np.random.default_rng(1)
    model = _input_bn(rng)
    assert sink_layout_ops(model, {}) is model  # only BN-derived nodes move
    model.graph.output.append(onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None))
    assert sink_layout_ops(model, BN) is model
    assert [n.op_type for n in model.graph.node] == ["Mul", "Add", "Transpose", "Conv"]


def test_two_stacked_bns_behind_one_transpose_both_move():
    """Moving the Transpose above BN 2 puts it right after BN 1: it moves again."""
    rng = np.random.default_rng(2)
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (T[N,5,5,3] x) => (T[N,4,3,3] y) {
      m1 = Mul(x, s1)
      a1 = Add(m1, b1)
      m2 = Mul(a1, s2)
      a2 = Add(m2, b2)
      t = Transpose<perm=[0,3,1,2]>(a2)
      y = Conv(t, W)
    }"""
    inits = {f"{k}{i}": rng.uniform(0.5, 2.0, 3) for k in "sb" for i in (1, 2)}
    inits["W"] = rng.normal(0, 1, (4, 3, 3, 3))
    model = _named(build(text, inits), "m1", "a1", "m2", "a2", "to_nchw", "conv")
    names = {"m1": "bn1", "a1": "bn1", "m2": "bn2", "a2": "bn2"}
    moved = sink_layout_ops(model, names)
    assert [n.op_type for n in moved.graph.node] == [
        "Transpose",
        "Mul",
        "Add",
        "Mul",
        "Add",
        "Conv",
    ]
    feeds = {"x": rng.normal(0, 1, (2, 5, 5, 3)).astype(np.float32)}
    assert_same_outputs(model, moved, feeds)
    folded, _ = fold_batchnorm_with_report(moved, names=names)
    assert op_counts(folded) == {"Transpose": 1, "Conv": 1}
    assert_same_outputs(model, folded, feeds)


CONV1D = """<ir_version: 8, opset_import: ["" : 13]>
g (T[N,3,1,6] x) => (T[N,4,4] y) {
  c = Conv(x, W)
  t = Transpose<perm=[0,2,3,1]>(c)
  q = Squeeze(t, axes)
  m = Mul(q, s)
  y = Add(m, b)
}"""


def test_squeeze_moves_below_bn_then_bn_folds_into_conv():
    """tf2onnx's Conv1D: Conv → Transpose → Squeeze → BN; the BN folds into the Conv."""
    rng = np.random.default_rng(3)
    inits = {
        "W": rng.normal(0, 1, (4, 3, 1, 3)),
        "axes": np.array([1], np.int64),
        "s": rng.uniform(0.5, 2.0, 4),
        "b": rng.normal(0, 1, 4),
    }
    model = _named(build(CONV1D, inits), "conv", "to_nwc", "squeeze", "bn_mul", "bn_add")
    moved = sink_layout_ops(model, BN)
    assert [n.op_type for n in moved.graph.node] == ["Conv", "Transpose", "Mul", "Add", "Squeeze"]
    squeeze = moved.graph.node[-1]
    assert squeeze.name == "squeeze" and squeeze.output[0] == "y"
    feeds = {"x": rng.normal(0, 1, (2, 3, 1, 6)).astype(np.float32)}
    assert_same_outputs(model, moved, feeds)
    folded, records = fold_batchnorm_with_report(moved, names=BN)
    assert op_counts(folded) == {"Conv": 1, "Transpose": 1, "Squeeze": 1}
    assert [(r.name, r.action) for r in records] == [("bn", "folded_forward")]
    assert_same_outputs(model, folded, feeds)


DENSE3D = """<ir_version: 8, opset_import: ["" : 13]>
g (T[2,3,4] x) => (T[2,3,5] y) {
  r = Reshape(x, flat)
  z = MatMul(r, W)
  u = Reshape(z, back)
  v = Add(u, bias)
  m = Mul(v, s)
  y = Add(m, b)
}"""


def test_reshape_moves_below_bias_and_bn_then_all_fold_into_one_gemm():
    """tf2onnx's Dense on a rank-3 input: Reshape → MatMul → Reshape → bias → BN."""
    rng = np.random.default_rng(4)
    inits = {
        "flat": np.array([6, 4], np.int64),
        "W": rng.normal(0, 1, (4, 5)),
        "back": np.array([2, 3, 5], np.int64),
        "bias": rng.normal(0, 1, 5),
        "s": rng.uniform(0.5, 2.0, 5),
        "b": rng.normal(0, 1, 5),
    }
    names = ("flatten", "dense", "unflatten", "dense_bias", "bn_mul", "bn_add")
    model = _named(build(DENSE3D, inits), *names)
    moved = sink_layout_ops(model, BN)
    ops = [n.op_type for n in moved.graph.node]
    assert ops == ["Reshape", "MatMul", "Add", "Mul", "Add", "Reshape"]
    assert moved.graph.node[-1].output[0] == "y"
    feeds = {"x": rng.normal(0, 1, (2, 3, 4)).astype(np.float32)}
    assert_same_outputs(model, moved, feeds)
    folded, _ = fold_batchnorm_with_report(moved, names=BN)
    assert op_counts(folded) == {"Reshape": 2, "Gemm": 1}
    assert_same_outputs(model, folded, feeds)


def test_reshape_that_splits_the_channel_axis_stays():
    rng = np.random.default_rng(5)
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (T[2,6] x) => (T[2,2,3] y) {
      r = Reshape(x, shape)
      m = Mul(r, s)
      y = Add(m, b)
    }"""
    inits = {"shape": np.array([2, 2, 3], np.int64), "s": rng.uniform(1, 2, 3), "b": np.ones(3)}
    model = _named(build(text, inits), "reshape", "bn_mul", "bn_add")
    assert sink_layout_ops(model, BN) is model


def test_chain_left_for_want_of_shapes_is_logged(caplog):
    rng = np.random.default_rng(6)
    inits = {
        "W": rng.normal(0, 1, (4, 3, 1, 3)),
        "axes": np.array([1], np.int64),
        "s": rng.uniform(0.5, 2.0, 4),
        "b": rng.normal(0, 1, 4),
    }
    model = _named(build(CONV1D, inits), "conv", "to_nwc", "squeeze", "bn_mul", "bn_add")
    model.graph.input[0].type.tensor_type.ClearField("shape")  # nothing can be inferred
    with caplog.at_level("WARNING", logger="bnexport.export.passes.layout"):
        assert sink_layout_ops(model, BN) is model
    assert "Squeeze 'squeeze': shapes unknown, the BN chain after it stays" in caplog.text
