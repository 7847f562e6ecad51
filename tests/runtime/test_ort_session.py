"""``bnexport.runtime.make_session``: the project's one onnxruntime session maker.

Checked against NumPy (float32 graphs: rtol 1e-5, atol 1e-6, a few float32 roundings of
values of order 1): paths, bytes and ModelProtos; FusedNorm graphs through the plugin's
CPU path; ``optimize=False`` and ``threads`` as the session's own options; the x86 int8
precision mode where the kernels can saturate (and not for the quantizer's measurements);
load failures as one line naming the model; and that no other module of ``bnexport``
creates an ``InferenceSession`` itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from runtime_models import (
    dense_relu_model,
    dense_relu_reference,
    fused_norm_dense_model,
    fused_norm_dense_reference,
)

from bnexport.errors import FileMissingError, ModelFileError
from bnexport.runtime import make_session
from bnexport.runtime.cpu_features import ENV_VAR
from bnexport.runtime.int8_kernels import PRECISION_MODE_KEY, precision_mode_on

RTOL, ATOL = 1e-5, 1e-6
X = np.random.default_rng(7).standard_normal((5, 4)).astype(np.float32)


@pytest.mark.parametrize("form", ["path", "bytes", "proto"])
def test_every_model_form_runs_the_graph(tmp_path, form):
    model = dense_relu_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    source = {"path": path, "bytes": model.SerializeToString(), "proto": model}[form]
    y, z = make_session(source).run(["y", "z"], {"x": X})
    want = dense_relu_reference(X)
    np.testing.assert_allclose(y, want["y"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(z, want["z"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("optimize", [True, False])
def test_fused_norm_graph_runs_through_the_plugin(optimize):
    """A graph with ``bnexport::FusedNorm``: plain onnxruntime would refuse the op."""
    model = fused_norm_dense_model()
    with pytest.raises(Exception, match="FusedNorm"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = make_session(model, optimize=optimize).run(["y"], {"x": X})
    np.testing.assert_allclose(y, fused_norm_dense_reference(X), rtol=RTOL, atol=ATOL)


def test_optimize_and_threads_are_the_sessions_options():
    level = ort.GraphOptimizationLevel
    options = make_session(dense_relu_model(), optimize=False, threads=3).get_session_options()
    assert options.graph_optimization_level == level.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    default = make_session(dense_relu_model()).get_session_options()
    assert default.graph_optimization_level == level.ORT_ENABLE_ALL
    mine = ort.SessionOptions()
    mine.log_severity_level = 3
    fused = make_session(fused_norm_dense_model(), optimize=False, session_options=mine)
    assert fused.get_session_options().graph_optimization_level == level.ORT_DISABLE_ALL
    assert fused.get_session_options().log_severity_level == 3  # the caller's options kept


@pytest.mark.needs(
    "x86",
    unverified=f"the exact u8u8 mode ({PRECISION_MODE_KEY}: onnxruntime's x86 builds only)",
)
def test_exact_int8_where_the_kernels_saturate(monkeypatch):
    from test_int8_kernels import _weights, qdq_matmul

    model = qdq_matmul(_weights(127))
    monkeypatch.setenv(ENV_VAR, "novnni")
    assert precision_mode_on(make_session(model).get_session_options())
    raw = make_session(model, exact_int8=False)  # the quantizer measures the raw kernels
    assert not precision_mode_on(raw.get_session_options())
    from bnexport.quantize.compare import make_session as measuring_session

    assert not precision_mode_on(measuring_session(model).get_session_options())
    monkeypatch.setenv(ENV_VAR, "vnni")
    assert not precision_mode_on(make_session(model).get_session_options())


def test_load_failures_are_one_line_naming_the_model(tmp_path):
    with pytest.raises(FileMissingError, match="nope.onnx"):
        make_session(tmp_path / "nope.onnx")
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        make_session(b"\x00garbage")
    unknown = dense_relu_model()
    unknown.graph.node[2].op_type = "NoSuchOp"
    onnx.save(unknown, tmp_path / "bad.onnx")
    with pytest.raises(ModelFileError, match=r"bad\.onnx: onnxruntime cannot load") as info:
        make_session(tmp_path / "bad.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="^served-name: onnxruntime cannot load"):
        make_session(unknown, model_name="served-name")


def test_no_other_module_creates_an_inference_session():
    """One home: verify, quantize, parity and the Session backend all go through it."""
    root = Path(__file__).resolve().parents[2] / "bnexport"
    makers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"\bInferenceSession\(", re.sub(r"``[^`]*``", "", path.read_text()))
    )
    assert makers == ["runtime/ort_session.py"]
