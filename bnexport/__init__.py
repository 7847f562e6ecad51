"""bnexport: batch-normalized Keras models from training to fast, verified GPU inference.

``import bnexport`` is light: TensorFlow, onnxruntime and TensorRT are imported only
when the attribute that needs them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnexport.errors import BnexportError
from bnexport.lazy_names import import_name as _import_name
from bnexport.lazy_names import lazy_names as _lazy_names

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "BatchNormalization": "bnexport.layers.batch_normalization",
    "SyncBatchNormalization": "bnexport.layers.batch_normalization",
    "recalibrate": "bnexport.layers.recalibrate",
    "export": "bnexport.compose",  # the exporter, then (int8=) the quantizer
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
    from bnexport.compose import export as export
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


def _resolve(name: str) -> Any:
    """The object the public name ``bnexport.<name>`` stands for, imported on first use.

    The callable ``bnexport.export`` package calls ``_resolve("export")``: once a submodule
    of ``bnexport.export`` is imported, Python binds that name to the package, and the
    package forwards here, so both objects run the same function.

    Raises:
        AttributeError: no such public name.
        MissingExtraError: the optional extra it needs is not installed (named).
    """
    return _import_name("bnexport", _LAZY, name)


__getattr__, __dir__ = _lazy_names("bnexport", _LAZY, globals(), public=__all__)
