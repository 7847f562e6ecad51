"""Threads per onnxruntime run of a served model: the cores it may use over the runs in flight.

``instances`` batches of one model run at once; each run's intra-op threads default to
``cores // instances`` (at least 1) so that the runs together fill the cores once instead
of putting ``instances x cores`` threads on them. The cores are the process's affinity
mask; every test overrides it so that nothing depends on this machine's core count.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper

from bnexport.serve.core import session_options
from bnexport.serve.core.session_options import (
    available_cores,
    ort_session_kwargs,
    threads_per_run,
)


@pytest.mark.parametrize(
    ("instances", "cores", "want"),
    [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5), (4, 6, 1), (1, 1, 1), (0, 4, 4)],
)
def test_threads_per_run_is_cores_over_instances(instances: int, cores: int, want: int) -> None:
    assert threads_per_run(instances, cores) == want


def test_available_cores_reads_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # a process pinned to 3 of the machine's cores (taskset, a container's cpuset) sees 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cores() == 3
    assert threads_per_run(1) == 3
    assert threads_per_run(2) == 1


def test_available_cores_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cores() == 6


@pytest.mark.parametrize(("instances", "cores", "want"), [(1, 4, 4), (2, 4, 2), (4, 4, 1)])
def test_session_kwargs_split_the_cores(instances: int, cores: int, want: int) -> None:
    options = ort_session_kwargs("onnxruntime", 0, False, instances=instances, cores=cores)[
        "session_options"
    ]
    assert options.intra_op_num_threads == want
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_session_kwargs_default_cores_from_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_options, "available_cores", lambda: 6)
    options = ort_session_kwargs("onnxruntime", 0, True, instances=2)["session_options"]
    assert options.intra_op_num_threads == 3


def test_explicit_threads_win_and_tensorrt_takes_none() -> None:
    options = ort_session_kwargs("onnxruntime", 3, True, instances=4, cores=2)["session_options"]
    assert options.intra_op_num_threads == 3
    assert ort_session_kwargs("tensorrt", 0, False, instances=2, cores=8) == {}


def test_session_built_with_the_options_runs_with_them(tmp_path) -> None:
    """The options reach onnxruntime: the session reports the thread count and still
    computes x @ W (float32, rtol 1e-6 against NumPy)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "mm.onnx"
    path.write_bytes(model.SerializeToString())
    options = ort_session_kwargs("onnxruntime", 0, False, instances=2, cores=6)["session_options"]
    sess = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert sess.get_session_options().intra_op_num_threads == 3
    x = rng.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w, rtol=1e-6, atol=1e-6)


def test_served_model_gets_cores_over_instances(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bnexport serve --instances 2`` on 6 cores: each run of the loaded model uses 3 threads."""
    from bnexport.serve.loading import load_repository
    from bnexport.serve.settings import ServeSettings

    path = tmp_path / "relu.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    monkeypatch.setattr(session_options, "available_cores", lambda: 6)
    for instances, want in ((1, 6), (2, 3), (4, 1)):
        repo = load_repository(path, ServeSettings(instances=instances, warmup=False))
        (served,) = repo.all()
        ort_session = served.session._impl.session
        assert ort_session.get_session_options().intra_op_num_threads == want
        x = np.array([[-1.0, 0.5, 2.0]], np.float32)
        np.testing.assert_array_equal(served.run({"x": x})["y"], np.maximum(x, 0))
