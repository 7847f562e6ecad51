"""The FusedNorm ONNX node: attributes, schema, checker and shape inference."""

from __future__ import annotations

import onnx
import pytest
from bnexport_plugins.fused_norm import onnx_node, spec
from fused_norm_graphs import fused_norm_model
from onnx import TensorProto, helper

from bnexport.errors import PluginError


def test_make_node_writes_every_plugin_attribute():
    node = onnx_node.make_node(["x", "s", "b"], ["y"], name="bn0", activation="relu")
    names = [a.name for a in node.attribute]
    assert names == sorted(names)  # the order the TensorRT AOT path relies on
    assert set(names) == set(spec.ATTRIBUTE_DEFAULTS) | {"plugin_namespace"}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"bnexport" and attrs["activation"] == b"relu"
    assert node.op_type == "FusedNorm" and node.domain == "bnexport"
    stats = onnx_node.make_node(
        ["x", "s", "b"], ["y", "m", "v"], mode="batch_stats", return_stats=1
    )
    assert (
        helper.get_attribute_value(next(a for a in stats.attribute if a.name == "plugin_namespace"))
        == b"bnexport_stats"
    )


def test_make_node_output_count_must_match_return_stats():
    with pytest.raises(PluginError, match="needs 3 named"):
        onnx_node.make_node(["x", "s", "b"], ["y"], mode="batch_stats", return_stats=1)
    with pytest.raises(PluginError, match="needs 1 named"):
        onnx_node.make_node(["x", "s", "b"], ["y", "m", "v"])


def test_register_schema_is_idempotent():
    onnx_node.register_onnx_schema()
    onnx_node.register_onnx_schema()
    assert onnx.defs.has("FusedNorm", "bnexport")


@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_checker_and_shape_inference(elem):
    model = fused_norm_model(
        elem, ["N", 8, 5, 5], mode="batch_stats", virtual_batch_size=2, return_stats=1
    )
    onnx.checker.check_model(model, full_check=True)
    # drop the declared output shapes: inference must produce them
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.output}
    dims = lambda t: [d.dim_value or d.dim_param or None for d in t.shape.dim]  # noqa: E731
    assert types["y"].elem_type == elem and dims(types["y"]) == ["N", 8, 5, 5]
    mean = types["mean"]
    assert mean.elem_type == TensorProto.FLOAT and len(mean.shape.dim) == 2
    assert not mean.shape.dim[0].HasField("dim_value") and mean.shape.dim[1].dim_value == 8


def test_shape_inference_static_ghost_count():
    model = fused_norm_model(
        TensorProto.FLOAT,
        [6, 4, 3],
        mode="batch_stats",
        virtual_batch_size=3,
        return_stats=1,
        stats_shape=[2, 4],
    )
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    mean = next(v for v in inferred.graph.output if v.name == "mean")
    assert [d.dim_value for d in mean.type.tensor_type.shape.dim] == [2, 4]


@pytest.mark.parametrize(
    "shape,attrs,scale_len,match",
    [
        ([2, 8, 4], {}, 7, "scale must have shape"),
        ([5, 8, 4], {"mode": "batch_stats", "virtual_batch_size": 2}, 8, "does not divide"),
        ([2, 8], {"axis": 2}, 8, "axis out of range"),
    ],
)
def test_shape_inference_rejects_bad_graphs(shape, attrs, scale_len, match):
    model = fused_norm_model(TensorProto.FLOAT, shape, **attrs)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = scale_len
    with pytest.raises(onnx.shape_inference.InferenceError, match=match):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_shape_inference_rejects_double():
    model = fused_norm_model(TensorProto.FLOAT, [2, 3])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(onnx.shape_inference.InferenceError, match="unsupported dtype"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_identity_comes_from_spec_only():
    """One definition of "a FusedNorm node": op type and domain, subgraphs included."""
    model = fused_norm_model(TensorProto.FLOAT, ["N", 4, 3, 3])
    (node,) = model.graph.node
    assert spec.is_fused_norm(node) and spec.has_fused_norm(model)
    assert spec.has_fused_norm(model.graph)
    other_domain = helper.make_node("FusedNorm", ["x", "s", "b"], ["y"], domain="other")
    assert not spec.is_fused_norm(other_domain)
    plain = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    assert not spec.has_fused_norm(plain)
    body = helper.make_graph(list(model.graph.node), "body", [], [])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    nested = helper.make_graph([cond], "outer", [], [])
    assert spec.has_fused_norm(nested)  # inside an If branch


def test_node_attribute_values_fills_defaults_and_names_the_node():
    node = helper.make_node("FusedNorm", ["x", "s", "b"], ["y"], name="bn7", domain="bnexport")
    assert spec.node_attribute_values(node) == spec.validate_attributes(spec.ATTRIBUTE_DEFAULTS)
    bad = helper.make_node(
        "FusedNorm", ["x", "s", "b"], ["y"], name="bn8", domain="bnexport", activation="gelu"
    )
    with pytest.raises(PluginError, match=r"node 'bn8'.*activation"):
        spec.node_attribute_values(bad)
