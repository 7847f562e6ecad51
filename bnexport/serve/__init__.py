"""KServe v2 inference server and Triton export (extra ``bnexport[serve]``).

- :func:`serve_model`: serve ``MODEL.onnx`` or a model repository (blocking).
- :func:`create_app`: the ASGI app, for embedding or tests.
- :class:`ModelRepository`: the models served, loaded through ``bnexport.Session``.
- :func:`write_triton_repo`: a Triton model repository with a validated config.pbtxt.

Names are imported on first use, so ``import bnexport.serve`` does not load
FastAPI or onnxruntime. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "serve_model": "bnexport.serve.server",
    "curl_example": "bnexport.serve.server",
    "create_app": "bnexport.serve.rest.app",
    "ModelRepository": "bnexport.serve.core.repository",
    "write_triton_repo": "bnexport.serve.triton.repo",
    "kserve_inferenceservice_yaml": "bnexport.serve.triton.repo",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnexport.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
