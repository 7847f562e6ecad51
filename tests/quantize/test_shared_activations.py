"""A tensor read by several nodes gets one Q/DQ pair per reader, so that onnxruntime's x86
int8 path (int8 Q/DQ pairs converted to uint8 when a Q has exactly one DQ) runs every
Conv as QLinearConv."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from qmodels import branchy_cnn, images

import bnexport
from bnexport.quantize.compare import make_session


def _optimized_ops(path, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)


def test_every_reader_has_its_own_pair_and_every_conv_runs_int8(tmp_path):
    onnx.save(branchy_cnn(), tmp_path / "b.onnx")
    calib = images(32)
    report = bnexport.quantize(tmp_path / "b.onnx", tmp_path / "q.onnx", calib)
    assert set(report.quantized_nodes) == {"conv0", "conv_a", "conv_b", "fc"}
    model = onnx.load(tmp_path / "q.onnx")
    readers = collections.Counter(name for node in model.graph.node for name in node.input)
    readers.update(o.name for o in model.graph.output)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    r0_scales = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in init:
            assert readers[node.output[0]] == 1, node.name  # one reader per Q and per DQ
        if node.op_type == "QuantizeLinear" and node.input[0] == "r0":
            r0_scales.append(float(init[node.input[1]]))
    # r0 feeds conv_a, conv_b and add_res: three pairs, scales within 2 float32 ulps
    assert len(r0_scales) == 3
    assert max(r0_scales) / min(r0_scales) - 1 < 3 * np.finfo(np.float32).eps
    ops = _optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops
    # numbers: the graph still computes the fake-quant math of one shared scale (ORT with
    # optimizations off), and the int8 kernels stay close to the float32 graph
    x = images(16, seed=3)
    fp32 = make_session(tmp_path / "b.onnx").run(None, {"x": x})[0]
    got = make_session(model).run(None, {"x": x})[0]
    assert float(np.sum((got - fp32) ** 2) / np.sum(fp32**2)) <= 0.01
