"""KServe v2 inference server and Triton export (extra ``bnexport[serve]``).

- :func:`serve_model`: serve ``MODEL.onnx`` or a model repository (blocking), as
  ``serve_model(path, ServeSettings(port=8000, grpc_port=8001))``.
- :class:`ServeSettings`: every server setting and its default, in one object.
- :func:`create_app`: the ASGI app, for embedding or tests.
- :class:`ModelRepository`: the models served, loaded through ``bnexport.Session``.
- :func:`write_triton_repo`: a Triton model repository with a validated config.pbtxt.

Names are imported on first use, so ``import bnexport.serve`` does not load
FastAPI or onnxruntime. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from bnexport.lazy_names import lazy_names

_LAZY = {
    "serve_model": "bnexport.serve.server",
    "curl_example": "bnexport.serve.server",
    "ServeSettings": "bnexport.serve.settings",
    "create_app": "bnexport.serve.rest.app",
    "ModelRepository": "bnexport.serve.core.repository",
    "write_triton_repo": "bnexport.serve.triton.repo",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
