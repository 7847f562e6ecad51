"""``fold_batchnorm``: make batch normalization free in an ONNX graph, or one node.

The pass pipeline (onnx-ir passes in one ``PassManager``, then dead-node removal), after
:class:`~.merge_pad.MergePadIntoConvPass` (a constant zero ``Pad`` into the next ``Conv``'s
``pads``, so a normalization in front of the ``Pad`` can reach the ``Conv``) and shape
inference (:mod:`.shapes`; a failure is named in the report of each BN whose rank it left
unknown):

1. :class:`~.patterns.CanonicalizeAffinePass` — every inference ``BatchNormalization``
   and per-channel constant ``Mul``/``Add``/``Sub``/``Div`` chain becomes one internal
   placeholder ``y = x·scale + shift`` (float64, see :mod:`.patterns`);
2. :class:`~.forward.ForwardFoldPass` — into the producing Conv/ConvTranspose/Gemm/MatMul;
3. :class:`~.backward.BackwardFoldPass` — into the consuming Conv/Gemm/MatMul, when exact;
4. :class:`~.fuse.FuseNormPass` — the rest becomes one node (ONNX op or FusedNorm);
5. :class:`~.training.TrainingBatchNormPass` — ``training_mode=1`` BNs: kept (``onnx``)
   or FusedNorm ``batch_stats`` (``plugin``);
6. ``RemoveUnusedNodesPass`` — drops the replaced nodes and initializers.

Only the main graph is rewritten (not If/Loop bodies or functions). The input model is
not modified. Every normalization gets a :class:`~bnexport.export.report.FoldRecord`.

float16: folding is computed in float64 and cast once. A folded tensor that would not
fit float16 (``|w| > 65504``, or an output slice flushed to all zeros) is never written
as inf/0: with ``keep_float16_overflow="float32"`` the op that needs it runs in float32
between two ``Cast`` nodes (and the record says so); with ``"error"`` a
:class:`~bnexport.errors.FoldError` names the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bnexport.errors import BnexportError, FoldError
from bnexport.export.passes.backward import BackwardFoldPass
from bnexport.export.passes.context import FoldContext
from bnexport.export.passes.forward import ForwardFoldPass
from bnexport.export.passes.fuse import FuseNormPass
from bnexport.export.passes.merge_pad import MergePadIntoConvPass
from bnexport.export.passes.patterns import CanonicalizeAffinePass
from bnexport.export.passes.training import TrainingBatchNormPass
from bnexport.export.report import FoldRecord
from bnexport.graph.shapes import infer_shapes

__all__ = ["FoldBatchNormPass", "fold_batchnorm", "fold_batchnorm_with_report"]


class FoldBatchNormPass(ir.passes.InPlacePass):
    """The whole folding pipeline as one in-place pass; ``records`` holds the report."""

    def __init__(
        self,
        *,
        fused_norm: Literal["onnx", "plugin"] = "onnx",
        names: Mapping[str, str] | None = None,
        keep_float16_overflow: Literal["float32", "error"] = "float32",
    ) -> None:
        super().__init__()
        if fused_norm not in ("onnx", "plugin"):
            raise ValueError(f"fused_norm must be 'onnx' or 'plugin'. Received: {fused_norm!r}")
        if keep_float16_overflow not in ("float32", "error"):
            raise ValueError(
                "keep_float16_overflow must be 'float32' or 'error'. "
                f"Received: {keep_float16_overflow!r}"
            )
        self.ctx = FoldContext(fused_norm, dict(names or {}), keep_float16_overflow)

    @property
    def records(self) -> list[FoldRecord]:
        """One record per normalization, in graph order of discovery."""
        return self.ctx.records

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Run the pipeline on ``model`` in place (after the Pad merge and shape inference)."""
        merged = MergePadIntoConvPass()(model).modified
        self.ctx.shape_error = infer_shapes(model)
        manager = ir.passes.PassManager(
            [
                CanonicalizeAffinePass(self.ctx),
                ForwardFoldPass(self.ctx),
                BackwardFoldPass(self.ctx),
                FuseNormPass(self.ctx),
                TrainingBatchNormPass(self.ctx),
                RemoveUnusedNodesPass(),
            ],
            steps=1,
        )
        return ir.passes.PassResult(model, manager(model).modified or merged)


def _unwrap(exc: BaseException) -> BaseException:
    """The innermost cause of a pass-manager error (our own errors are wrapped)."""
    while exc.__cause__ is not None and not isinstance(exc, BnexportError):
        exc = exc.__cause__
    return exc


def fold_batchnorm_with_report(
    model: onnx.ModelProto,
    *,
    fused_norm: Literal["onnx", "plugin"] = "onnx",
    names: Mapping[str, str] | None = None,
    keep_float16_overflow: Literal["float32", "error"] = "float32",
) -> tuple[onnx.ModelProto, list[FoldRecord]]:
    """Fold batch normalization in ``model``; return the new model and the report.

    Args:
        model: any ONNX model (not modified).
        fused_norm: what a normalization that cannot fold becomes: ``"onnx"`` (one standard
            ONNX node) or ``"plugin"`` (one ``bnexport::FusedNorm`` node, absorbing a
            following Relu/Relu6/LeakyRelu/Sigmoid/SiLU).
        names: ONNX node or tensor name -> Keras layer name, used in the report.
        keep_float16_overflow: ``"float32"`` runs an op whose folded float16 weights would
            overflow in float32 between Casts; ``"error"`` raises instead.

    Returns:
        ``(folded_model, records)``.

    Raises:
        FoldError: a node the pass cannot handle (named), or a float16 overflow under
            ``keep_float16_overflow="error"``.
        ExportError: BN statistics with NaN/Inf or negative variance (node named).
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto. Received: {type(model).__name__}")
    ir_model = ir.serde.deserialize_model(model)
    records = fold_ir_model(
        ir_model, fused_norm=fused_norm, names=names, keep_float16_overflow=keep_float16_overflow
    )
    return ir.serde.serialize_model(ir_model), records


def fold_ir_model(
    ir_model: ir.Model,
    *,
    fused_norm: Literal["onnx", "plugin"] = "onnx",
    names: Mapping[str, str] | None = None,
    keep_float16_overflow: Literal["float32", "error"] = "float32",
) -> list[FoldRecord]:
    """Run the fold pipeline on an ``onnx_ir`` model in place; return the report records.

    Arguments and errors as :func:`fold_batchnorm_with_report`, whose ``ModelProto`` round
    trip this skips (the Keras-native emitter already holds an ``onnx_ir`` model).
    """
    fold = FoldBatchNormPass(
        fused_norm=fused_norm, names=names, keep_float16_overflow=keep_float16_overflow
    )
    try:
        fold(ir_model)
    except (ir.passes.PassError, ir.passes.InvariantError) as exc:
        cause = _unwrap(exc)
        if isinstance(cause, BnexportError):
            raise cause from None
        if isinstance(cause, ir.passes.PreconditionError):
            raise FoldError(str(cause)) from None
        raise
    return fold.records


def fold_batchnorm(
    model: onnx.ModelProto,
    *,
    fused_norm: Literal["onnx", "plugin"] = "onnx",
    names: Mapping[str, str] | None = None,
    keep_float16_overflow: Literal["float32", "error"] = "float32",
) -> onnx.ModelProto:
    """Fold batch normalization in ``model`` (see :func:`fold_batchnorm_with_report`)."""
    folded, _ = fold_batchnorm_with_report(
        model, fused_norm=fused_norm, names=names, keep_float16_overflow=keep_float16_overflow
    )
    return folded
