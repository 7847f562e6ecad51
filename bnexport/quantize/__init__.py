"""INT8 deployment: fold, calibrate and quantize a float32 ONNX graph to a QDQ graph.

``bnexport.quantize(src, dst, calibration, ...)`` is both this package and its main
function: the package module is callable, so ``import bnexport.quantize.calibration``
elsewhere never shadows the function (a subpackage import rebinds the parent's
attribute to the module).

Modules: :mod:`.calibration` (accept/validate/replay data), :mod:`.qdq`
(``onnxruntime.quantization`` settings and the QDQ structure check), :mod:`.compare`
(INT8 vs float32 metrics), :mod:`.sensitivity` (per-node sensitivity, auto-exclude),
:mod:`.verdict` (quantization vs kernel error, the target), :mod:`.kernel_emulation`
(non-VNNI int8 kernels in NumPy), :mod:`.report` (:class:`QuantizeReport`),
:mod:`.pipeline` (the whole job).
Nothing heavy is imported here: onnx and onnxruntime load on first call.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from bnexport.quantize.pipeline import QuantizeSettings, quantize, quantize_model
from bnexport.quantize.report import QuantizeReport
from bnexport.quantize.verdict import BelowTargetError

__all__ = ["BelowTargetError", "QuantizeReport", "QuantizeSettings", "quantize", "quantize_model"]


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`bnexport.quantize.pipeline.quantize`."""

    def __call__(self, *args: Any, **kwargs: Any) -> QuantizeReport:
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
