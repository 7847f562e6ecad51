"""The exporter's ``int8=calibration`` path: export -> fold -> quantize in one call.

:func:`bnexport.export` calls :func:`check_int8_options` before any work and
:func:`quantize_export` on the folded, checked (and verified) float32 graph; the file at
``path`` is then the INT8 graph and ``ExportReport.int8`` the
:class:`~bnexport.quantize.report.QuantizeReport` (its ``fold_records`` are the
exporter's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bnexport.errors import ExportError


def check_int8_options(dtype: str, fused_norm: str) -> None:
    """Refuse export options that cannot give an INT8 graph (before any work).

    Raises:
        ExportError: ``dtype`` is not float32 or ``fused_norm`` is ``"plugin"``.
    """
    if dtype != "float32":
        raise ExportError(
            f"int8= needs dtype='float32' (INT8 is quantized from the float32 graph). "
            f"Received: dtype={dtype!r}"
        )
    if fused_norm != "onnx":
        raise ExportError(
            "int8= needs fused_norm='onnx' (onnxruntime calibrates the graph; it cannot run "
            f"bnexport::FusedNorm). Received: fused_norm={fused_norm!r}"
        )


def quantize_export(
    folded: Any, calibration: Any, records: Sequence[Any]
) -> tuple[Any, bytes, Any]:
    """Quantize the exporter's float32 graph; return ``(int8 model, its bytes, report)``.

    Raises:
        CalibrationError: bad calibration data (names the input).
        QuantizeError: an unfoldable BN (the exporter made it one node) or a failed
            quantization.
    """
    from bnexport.quantize.pipeline import quantize_model

    int8, report = quantize_model(folded, calibration, fold_records=list(records))
    report.source = "<export>"
    return int8, int8.SerializeToString(), report
