"""Graphs with bnexport::FusedNorm run through Session on CPU (plugin's onnxruntime path).

Checked against an independent NumPy formula; fp32 tolerance rtol=1e-5, atol=1e-5.
"""

from __future__ import annotations

import numpy as np


def _model(shape, attrs, n_out=1):
    from bnexport_plugins.fused_norm.onnx_node import make_node, opset_import
    from onnx import TensorProto, helper

    c = shape[attrs["axis"]]
    outs = ["Y", "mean", "var"][:n_out]
    node = make_node(["X", "scale", "shift"], outs, name="fn", **attrs)
    out_infos = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", *shape[1:]])]
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", *shape[1:]]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [c]),
            helper.make_tensor_value_info("shift", TensorProto.FLOAT, [c]),
        ],
        out_infos,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 8
    return model


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (
        rng.normal(2.0, 3.0, shape).astype(np.float32),
        rng.uniform(0.5, 1.5, c).astype(np.float32),
        rng.normal(0, 1, c).astype(np.float32),
    )


def test_affine_relu_on_cpu():
    from bnexport.runtime import Session

    shape = (4, 3, 5, 5)
    x, s, b = _data(shape)
    sess = Session(_model(shape, {"axis": 1, "mode": "affine", "activation": "relu"}))
    assert sess.backend == "onnxruntime"
    y = sess.run({"X": x, "scale": s, "shift": b})["Y"]
    ref = np.maximum(x.astype(np.float64) * s[:, None, None] + b[:, None, None], 0.0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_batch_stats_ghost_batches_on_cpu():
    from bnexport.runtime import Session

    shape = (6, 3, 4, 4)
    x, s, b = _data(shape, seed=1)
    attrs = {"axis": 1, "mode": "batch_stats", "epsilon": 1e-3, "virtual_batch_size": 2}
    y = Session(_model(shape, attrs)).run({"X": x, "scale": s, "shift": b})["Y"]
    g = x.astype(np.float64).reshape(3, 2, 3, 4, 4)  # contiguous ghost batches of 2
    mean = g.mean(axis=(1, 3, 4), keepdims=True)
    var = g.var(axis=(1, 3, 4), keepdims=True)
    ref = ((g - mean) / np.sqrt(var + 1e-3) * s[:, None, None] + b[:, None, None]).reshape(shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
