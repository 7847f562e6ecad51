"""onnxruntime GPU sessions: no silent CPU or fp32 fallback; the TensorRT EP cache has a path.

onnxruntime drops a GPU provider whose libraries fail to load (a log line) and runs the
graph on what is left. These tests stand in for onnxruntime-gpu (not installed here) by
reporting CUDA/TensorRT providers as available and a session that lost them, and check
what ``OrtBackend`` asks for and refuses. Not verified here: a real onnxruntime-gpu
session (needs a GPU).
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
from runtime_models import dense_relu_model

from bnexport.errors import BackendUnavailableError
from bnexport.runtime.io_check import tensor_infos_from_onnx
from bnexport.runtime.ort_backend import OrtBackend

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def fake_gpu_ort(monkeypatch, tmp_path):
    """onnxruntime reporting GPU providers; sessions keep only ``loaded`` of those asked."""
    state = {"loaded": list(GPU), "asked": None}

    class Session:
        def __init__(self, source, sess_options=None, providers=None):
            state["asked"] = providers
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            self._active = [n for n in names if n in state["loaded"]]

        def get_providers(self):
            return self._active

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU))
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setenv("BNEXPORT_CACHE_DIR", str(tmp_path))
    return state


def _backend(**kw):
    model = dense_relu_model()
    infos = tensor_infos_from_onnx(model.graph.input), tensor_infos_from_onnx(model.graph.output)
    return OrtBackend(model, None, *infos, device="cuda", **kw)


def test_cuda_session_that_fell_back_to_cpu_is_refused(fake_gpu_ort):
    fake_gpu_ort["loaded"] = ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider.*run on the CPU"):
        _backend()


def test_fp16_without_the_tensorrt_provider_is_refused(fake_gpu_ort):
    fake_gpu_ort["loaded"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match=r"TensorrtExecutionProvider.*fp32"):
        _backend(precision="fp16")


def test_providers_kept_and_tensorrt_cache_path(fake_gpu_ort, tmp_path):
    backend = _backend(precision="fp16")
    assert backend.providers == GPU
    trt_opts = dict(fake_gpu_ort["asked"])["TensorrtExecutionProvider"]
    assert trt_opts["trt_fp16_enable"] and trt_opts["trt_engine_cache_enable"]
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path / "ort-trt")
    assert (tmp_path / "ort-trt").is_dir()
    # a user's path wins
    _backend(providers_options={"TensorrtExecutionProvider": {"trt_engine_cache_path": "/x"}})
    assert dict(fake_gpu_ort["asked"])["TensorrtExecutionProvider"]["trt_engine_cache_path"] == "/x"
