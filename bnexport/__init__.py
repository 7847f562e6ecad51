"""bnexport: batch-normalized Keras models from training to fast, verified GPU inference.

``import bnexport`` is light: TensorFlow, onnxruntime and TensorRT are imported only
when the attribute that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnexport.errors import BnexportError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "BatchNormalization": "bnexport.layers.batch_normalization",
    "SyncBatchNormalization": "bnexport.layers.batch_normalization",
    "recalibrate": "bnexport.layers.recalibrate",
    "export": "bnexport.export.keras_export",
    "ExportReport": "bnexport.export.report",
    "fold_batchnorm": "bnexport.export.passes.fold_batchnorm",
    "fold_batchnorm_with_report": "bnexport.export.passes.fold_batchnorm",
    "Session": "bnexport.runtime.session",
    "check_parity": "bnexport.parity.check",
    "quantize": "bnexport.quantize",
    "QuantizeReport": "bnexport.quantize.report",
}

__all__ = ["BnexportError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from bnexport.export.keras_export import export as export
    from bnexport.export.passes.fold_batchnorm import fold_batchnorm as fold_batchnorm
    from bnexport.export.passes.fold_batchnorm import (
        fold_batchnorm_with_report as fold_batchnorm_with_report,
    )
    from bnexport.export.report import ExportReport as ExportReport
    from bnexport.layers.batch_normalization import BatchNormalization as BatchNormalization
    from bnexport.layers.batch_normalization import (
        SyncBatchNormalization as SyncBatchNormalization,
    )
    from bnexport.layers.recalibrate import recalibrate as recalibrate
    from bnexport.parity.check import check_parity as check_parity
    from bnexport.quantize.pipeline import quantize as quantize
    from bnexport.quantize.report import QuantizeReport as QuantizeReport
    from bnexport.runtime.session import Session as Session


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnexport' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:  # an optional extra is not installed: name it
        from bnexport.extras import missing_extra_error

        error = missing_extra_error(exc, f"bnexport.{name}")
        if error is None:
            raise
        raise error from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
