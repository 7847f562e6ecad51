"""Public functions composed from several packages, above them in the import graph.

``bnexport.export(model, path, int8=calibration)`` is the Keras exporter
(:func:`bnexport.export.keras_export.export`) followed by the quantizer
(:func:`bnexport.quantize.quantize_model`) on the folded, checked and verified float32
graph, before anything is written. The quantizer depends on the exporter (its fold pass
and report); the exporter does not know the quantizer: it takes the INT8 step as a
:class:`~bnexport.export.keras_export.GraphStage`. The facade (``bnexport/__init__.py``)
maps ``bnexport.export`` here, and so does the callable ``bnexport.export`` package.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from bnexport.errors import ExportError
from bnexport.export.keras_export import GraphStage
from bnexport.export.keras_export import export as export_float
from bnexport.export.report import ExportReport, FoldRecord


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


def export(
    model: Any, path: str | os.PathLike[str], *, int8: Any = None, **options: Any
) -> ExportReport:
    """``bnexport.export``: export ``model`` to ONNX at ``path``, BNs folded; optionally INT8.

    Args:
        model: as :func:`bnexport.export.keras_export.export`.
        path: the ONNX file to write (atomically).
        int8: calibration data (see :func:`bnexport.quantize`): export, fold, verify,
            then write the INT8 QDQ graph at ``path`` instead of the float32 one;
            ``report.int8`` is its :class:`~bnexport.quantize.report.QuantizeReport`
            (with the exporter's fold records) and ``report.timings["int8"]`` its seconds.
            Needs ``dtype="float32"`` and ``fused_norm="onnx"``.
        **options: the keyword arguments of :func:`bnexport.export.keras_export.export`
            (``opset``, ``dtype``, ``verify``, ``engine``, ``progress``, ...).

    Returns:
        The :class:`~bnexport.export.report.ExportReport` of the file written.

    Raises:
        ExportError: as the exporter, or options ``int8=`` cannot use (before any work).
        CalibrationError: bad calibration data (names the input).
        QuantizeError: a failed quantization. Nothing is written on any error.
    """
    if int8 is None:
        return export_float(model, path, **options)
    check_int8_options(options.get("dtype", "float32"), options.get("fused_norm", "onnx"))
    quantized: list[Any] = []

    def to_int8(folded: Any, records: list[FoldRecord]) -> Any:
        from bnexport.quantize.pipeline import quantize_model

        int8_model, report = quantize_model(folded, int8, fold_records=records)
        report.source = "<export>"
        quantized.append(report)
        return int8_model

    stage = GraphStage("int8", "quantizing to INT8", to_int8)
    report = export_float(model, path, before_write=stage, **options)
    report.int8 = quantized[0]
    return report


def _export_signature() -> inspect.Signature:
    """The exporter's keyword options and ``int8``, so ``help(bnexport.export)`` lists them."""
    options = inspect.signature(export_float).parameters.values()
    int8 = inspect.Parameter("int8", inspect.Parameter.KEYWORD_ONLY, default=None)
    kept = [p for p in options if p.name != "before_write"]
    return inspect.signature(export).replace(parameters=[*kept, int8])


export.__signature__ = _export_signature()  # type: ignore[attr-defined]
