"""Shape inference for the passes: onnx-ir's ``ShapeInferencePass``, failure kept.

``ShapeInferencePass`` runs ``onnx.shape_inference`` on a copy of the model without its
large initializers (it needs only their shapes) and merges the inferred types and
shapes into the IR values. When inference fails, it logs the error and leaves the model
unchanged — fine for a hint, wrong where shapes are needed. :func:`infer_shapes` runs
the pass and returns the error text instead of dropping it, so each caller decides what
a failure means: the fold passes put it in the reason of a BN they could not fold for
want of a rank, float16 conversion raises (its float32 islands need every input's type),
the layout passes log which chain they could not move.

Inference runs in strict mode first, which reports the first node it cannot infer; on
failure a non-strict run still gives every other value its shape (the passes rewrite
models that onnxruntime runs, not only models the ONNX checker accepts), and the strict
error is what the caller gets.
"""

from __future__ import annotations

import logging
import threading

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


class _FailureCatcher(logging.Handler):
    """Keeps the exception ``ShapeInferencePass`` logs (this thread's records only)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or record.thread != self.thread or self.error is not None:
            return  # e.g. "value not found in inferred graph": a note, not a failure
        self.error = f"{type(exc).__name__}: {str(exc).strip()}"


def _run(model: ir.Model, *, strict: bool) -> str | None:
    """One ``ShapeInferencePass`` run; the error it logged, if any."""
    logger = logging.getLogger(ShapeInferencePass.__module__)
    catcher = _FailureCatcher()
    logger.addHandler(catcher)
    try:
        ShapeInferencePass(check_type=False, strict_mode=strict, data_prop=False)(model)
    finally:
        logger.removeHandler(catcher)
    return catcher.error


def infer_shapes(model: ir.Model) -> str | None:
    """Give ``model``'s values the types and shapes ONNX shape inference finds (in place).

    Strict inference first; if it fails (a node whose inferred shape contradicts the
    declared one, say), a non-strict run still infers everything around the bad node.

    Returns:
        ``None`` when strict inference succeeded, else its error.
    """
    error = _run(model, strict=True)
    if error is not None:
        _run(model, strict=False)
    return error
