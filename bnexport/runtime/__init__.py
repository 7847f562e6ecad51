"""Run exported models: :class:`Session` over onnxruntime or TensorRT (never imports TensorFlow).

:func:`make_session` is the project's one way to make an ``onnxruntime.InferenceSession``
(FusedNorm graphs, optimizations off for tests, threads, the x86 int8 precision mode).
"""

from bnexport.runtime.io_check import TensorInfo
from bnexport.runtime.ort_session import make_session
from bnexport.runtime.session import Session

__all__ = ["Session", "TensorInfo", "make_session"]
