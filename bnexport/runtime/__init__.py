"""Run exported models: :class:`Session` over onnxruntime or TensorRT (never imports TensorFlow)."""

from bnexport.runtime.io_check import TensorInfo
from bnexport.runtime.session import Session

__all__ = ["Session", "TensorInfo"]
