"""``convert_to_float16`` on small ONNX graphs, and the shape inference the passes share.

Converted graphs run on onnxruntime (graph optimizations disabled) against the float32
original at the float16 tolerance of ``onnx_graphs`` (``1e-2``), pass the full checker,
and are counted op by op: a float32 island adds exactly two ``Cast`` nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import TOL, bn_params, build, check_valid, op_counts, run_ort

from bnexport.errors import ExportError
from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report
from bnexport.graph.float16 import convert_to_float16
from bnexport.graph.shapes import infer_shapes

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

CONV_RELU_GEMM = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,6,6] x) => (float[N,5] y) {
  c = Conv<pads=[1,1,1,1]>(x, W, B)
  r = Relu(c)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  y = Gemm<transB=1>(f, D, E)
}"""


def _inits(rng, big: float = 1.0):
    return {
        "W": rng.normal(0, 0.5, (4, 3, 3, 3)),
        "B": rng.normal(0, 0.1, 4),
        "D": rng.normal(0, 1.0, (5, 4)) * big,
        "E": rng.normal(0, 0.1, 5),
    }


def _assert_close_f16(converted, original, feeds):
    """Converted float16 outputs vs the float32 original, relative to the output's range."""
    (expected,) = run_ort(original, {k: v.astype(np.float32) for k, v in feeds.items()})
    (actual,) = run_ort(converted, feeds)
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    tol = TOL[np.float16]
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, rtol=tol, atol=tol * np.abs(expected).max()
    )


def _io_types(model):
    return [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]


def test_everything_becomes_float16():
    rng = np.random.default_rng(0)
    model = build(CONV_RELU_GEMM, _inits(rng))
    converted, kept = convert_to_float16(model)
    assert kept == []
    assert op_counts(converted) == op_counts(model)
    assert _io_types(converted) == [F16, F16]
    assert {i.data_type for i in converted.graph.initializer} == {F16}
    check_valid(converted)
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float16)
    _assert_close_f16(converted, model, {"x": x})
    assert model.graph.initializer[0].data_type == F32  # the input is not modified


def test_overflowing_weight_keeps_its_node_in_float32():
    rng = np.random.default_rng(1)
    model = build(CONV_RELU_GEMM, _inits(rng, big=1e5))  # |D| up to ~3e5 > 65504
    model.graph.node[-1].name = "head"
    converted, kept = convert_to_float16(model)
    assert kept == ["head"]
    counts = op_counts(converted)
    assert counts.pop("Cast") == 2 and counts == op_counts(model)
    gemm = next(n for n in converted.graph.node if n.op_type == "Gemm")
    types = {i.name: i.data_type for i in converted.graph.initializer}
    assert [types[name] for name in gemm.input[1:]] == [F32, F32]
    assert types["W"] == F16
    assert converted.graph.output[0].name == "y"  # the island's output keeps its name
    check_valid(converted)
    x = rng.normal(0, 1e-3, (2, 3, 6, 6)).astype(np.float16)
    _assert_close_f16(converted, model, {"x": x})


def test_overflow_error_policy_names_the_layer():
    model = build(CONV_RELU_GEMM, _inits(np.random.default_rng(2), big=1e5))
    model.graph.node[-1].name = "head"
    with pytest.raises(ExportError, match=r"classifier: folded weight 'D' of node 'head'"):
        convert_to_float16(model, on_overflow="error", labels={"head": "classifier"})


def test_float32_io_casts_inside_the_graph():
    rng = np.random.default_rng(3)
    model = build(CONV_RELU_GEMM, _inits(rng))
    converted, _ = convert_to_float16(model, io_dtype="float32")
    assert _io_types(converted) == [F32, F32]
    assert [v.name for v in converted.graph.input] == ["x"]
    assert [v.name for v in converted.graph.output] == ["y"]
    counts = op_counts(converted)
    assert counts.pop("Cast") == 2 and counts == op_counts(model)
    check_valid(converted)
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    _assert_close_f16(converted, model, {"x": x})


def test_initializer_shared_with_an_island_gets_a_float16_copy():
    """``D`` feeds the Gemm kept in float32 (for ``E``) and a MatMul that can run in float16."""
    rng = np.random.default_rng(4)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,5] y, float[N,5] z) {
      y = Gemm<transB=1, beta=0.00001>(x, D, E)
      t = Transpose<perm=[1,0]>(D)
      z = MatMul(x, t)
    }"""
    inits = {"D": rng.normal(0, 0.5, (5, 4)), "E": np.full(5, 1e5)}
    model = build(text, inits)
    converted, kept = convert_to_float16(model)
    assert len(kept) == 1
    types = {i.name: i.data_type for i in converted.graph.initializer}
    assert types == {"D": F32, "E": F32, "D_fp16": F16}
    check_valid(converted)
    x = rng.normal(0, 1, (3, 4)).astype(np.float16)
    expected = run_ort(model, {"x": x.astype(np.float32)})
    for got, want in zip(run_ort(converted, {"x": x}), expected, strict=True):
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-2, atol=1e-2)


def test_island_input_of_unknown_type_is_an_error_naming_the_node():
    """A custom op's output has no type: the island could not know it must cast it."""
    text = """<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
    g (float[N,4] x) => (float[N,5] y) {
      u = custom.Opaque(x)
      y = Gemm<transB=1>(u, D, E)
    }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.full((5, 4), 1e5, np.float32), "D"),
            onnx.numpy_helper.from_array(np.zeros(5, np.float32), "E"),
        ]
    )
    model.graph.node[-1].name = "head"
    with pytest.raises(ExportError, match=r"node 'head' must run in float32 .* input 'u'"):
        convert_to_float16(model)


def test_infer_shapes_returns_the_failure_and_still_infers_the_rest():
    import onnx_ir as ir

    good = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,5,5] x) => (float[N,3,5,5] y) { c = Relu(x)  y = Relu(c) }"""
    )
    model = ir.serde.deserialize_model(good)
    assert infer_shapes(model) is None
    assert model.graph.node(0).outputs[0].shape.rank() == 4

    bad = onnx.parser.parse_model(  # the declared output contradicts the graph
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,5,5] x) => (float[7] y) { c = Relu(x)  y = Relu(c) }"""
    )
    model = ir.serde.deserialize_model(bad)
    error = infer_shapes(model)
    assert error is not None and "existing shape differ" in error
    c = model.graph.node(0).outputs[0]
    assert c.dtype == ir.DataType.FLOAT and c.shape.rank() == 4  # the non-strict fallback


def test_fold_report_names_the_shape_inference_failure():
    """A BN on an input of unknown rank is kept; its reason names the failure (at ``z``)."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float x, float[N,3] w) => (float y, float[9] z) {
      y = BatchNormalization(x, g, b, m, v)
      z = Relu(w)
    }"""
    model = onnx.parser.parse_model(text)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.ClearField("shape")  # rank unknown
    params = bn_params(np.random.default_rng(5), 3)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()
    )
    _, records = fold_batchnorm_with_report(model)
    assert [r.action for r in records] == ["kept"]
    assert "BN input rank is unknown (shape inference failed: " in records[0].reason
    assert "existing shape differ" in records[0].reason
