"""``triton-repo --backend tensorrt`` builds the plan as ``Session`` does (no GPU here).

A stand-in ``tensorrt`` module makes the package "installed" and a stand-in
``TrtBackend`` records how the plan is built: a graph with ``bnexport::FusedNorm`` nodes
must register the plugin (``needs_fused_norm``), else TensorRT's parser reports "plugin
not found". Not verified here: building a real plan (needs TensorRT and a GPU).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from bnexport_plugins.fused_norm import onnx_node
from onnx import TensorProto, helper, numpy_helper
from runtime_models import dense_relu_model

from bnexport.serve.triton.repo import write_triton_repo


def _fused_norm_model() -> onnx.ModelProto:
    onnx_node.register_onnx_schema()
    node = onnx_node.make_node(["x", "scale", "shift"], ["y"], name="fn")
    graph = helper.make_graph(
        [node],
        "fused_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2, 2])],
        initializer=[
            numpy_helper.from_array(np.ones(4, np.float32), "scale"),
            numpy_helper.from_array(np.zeros(4, np.float32), "shift"),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), onnx_node.opset_import()]
    )


@pytest.fixture
def built(monkeypatch):
    """Record the TrtBackend calls of write_triton_repo; tensorrt 'installed'."""
    import bnexport.runtime.trt_backend as tb

    calls = []
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    class FakeBackend:
        def __init__(self, model_bytes, inputs, outputs, **kwargs):
            calls.append(kwargs)
            self.engine = types.SimpleNamespace(serialize=lambda: b"plan")

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(tb, "TrtBackend", FakeBackend)
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_plan_build_registers_the_plugin_for_fused_norm_graphs(built, tmp_path, fused):
    path: Path = tmp_path / "m.onnx"
    onnx.save(_fused_norm_model() if fused else dense_relu_model(), path)
    res = write_triton_repo(path, tmp_path / "repo", backend="tensorrt", max_batch=8)
    assert res.plan_written and res.model_file == tmp_path / "repo" / "m" / "1" / "model.plan"
    assert res.model_file.read_bytes() == b"plan" and not res.notes
    kwargs, closed = built
    assert kwargs["needs_fused_norm"] is fused and kwargs["max_batch"] == 8 and closed == "closed"
