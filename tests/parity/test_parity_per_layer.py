"""Per-layer helpers (exposing tensors, layout alignment, name maps) and runner life cycle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnexport.parity.per_layer import (
    METADATA_KEY,
    align,
    expose_tensors,
    heuristic_layer_map,
    layer_output_map,
    producer_index,
)
from bnexport.parity.runners import KerasRunner, OnnxrtRunner

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _chain() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m/dense_1/MatMul:0"], name="m/dense_1/MatMul"),
        helper.make_node("Relu", ["m/dense_1/MatMul:0"], ["m/act/Relu:0"], name="m/act/Relu"),
        helper.make_node("Neg", ["m/act/Relu:0"], ["y"], name="m/out/Neg"),
    ]
    graph = helper.make_graph(nodes, "chain", [x], [y], [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_expose_tensors_runs_and_leaves_original():
    from bnexport.runtime import Session

    model = _chain()
    probe = expose_tensors(model, ["m/dense_1/MatMul:0", "m/act/Relu:0", "y"])
    assert [o.name for o in model.graph.output] == ["y"]
    assert [o.name for o in probe.graph.output] == ["y", "m/dense_1/MatMul:0", "m/act/Relu:0"]
    assert probe.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    out = Session(probe).run(x)
    np.testing.assert_allclose(out["m/dense_1/MatMul:0"], x @ W, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["m/act/Relu:0"], np.maximum(x @ W, 0), rtol=1e-6, atol=1e-6)


def test_maps_metadata_then_heuristic():
    model = _chain()
    # "dense" is uniquified to dense_1 in the scope; "act" and "out" match exactly
    assert heuristic_layer_map(model, ["dense", "act", "out"]) == {
        "dense": "m/dense_1/MatMul:0",
        "act": "m/act/Relu:0",
        "out": "y",
    }
    # a layer really named dense_1 takes the scope from "dense"
    assert "dense" not in heuristic_layer_map(model, ["dense", "dense_1"])
    mapping, source = layer_output_map(model, ["act"])
    assert source == "heuristic"
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({"act": "m/act/Relu:0"})
    assert layer_output_map(model, ["act"]) == ({"act": "m/act/Relu:0"}, "metadata")
    assert producer_index(model)["m/act/Relu:0"] == 1 and producer_index(model)["x"] == -1


def test_align_layouts():
    k = np.random.default_rng(0).standard_normal((2, 5, 6, 3))
    same, note = align(k, k)
    assert note == "same" and same is k
    nchw = np.moveaxis(k, -1, 1)
    back, note = align(k, nchw)
    assert note == "channels_first->last"
    np.testing.assert_array_equal(back, k)
    explicit, note = align(k, nchw, perm=[0, 2, 3, 1])
    assert note.startswith("transpose") and np.array_equal(explicit, k)
    squeezed, note = align(k[:, :1, :1, :], k[:, 0, 0, :])
    assert note == "reshaped" and squeezed.shape == (2, 1, 1, 3)
    cube = np.zeros((2, 4, 4, 4))
    none, note = align(cube, cube)
    assert none is None and "ambiguous" in note  # NCHW or NHWC: cannot tell from shapes
    same, note = align(cube, cube, perm=[0, 1, 2, 3])
    assert note == "same" and same is cube
    none, note = align(k, np.zeros((2, 7)))
    assert none is None and "shape mismatch" in note


def test_runner_life_cycle_and_lazy_loader():
    import keras

    calls = []

    def loader():
        calls.append(1)
        inp = keras.Input((4,), name="x")
        return keras.Model(inp, keras.layers.Dense(3, name="d")(inp))

    runner = KerasRunner(loader)
    assert not calls  # nothing built before activate
    with pytest.raises(RuntimeError, match="call activate"):
        runner.infer({"x": np.zeros((1, 4), np.float32)})
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with runner:
        assert calls == [1]
        (meta,) = runner.get_input_metadata()
        assert meta.name == "x" and meta.shape == (None, 4)
        out = runner.infer({"x": x})
        kernel, bias = (np.asarray(w) for w in runner.source_model.get_layer("d").weights)
        np.testing.assert_allclose(out["d"], x @ kernel + bias, rtol=1e-5, atol=1e-6)
        assert runner.last_inference_time is not None
    assert not runner.is_active


def test_onnxrt_runner_is_interchangeable():
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    with OnnxrtRunner(_chain) as runner:  # a loader: called on activate
        assert [i.name for i in runner.get_input_metadata()] == ["x"]
        np.testing.assert_allclose(
            runner.infer({"x": x})["y"], -np.maximum(x @ W, 0), rtol=1e-6, atol=1e-6
        )
