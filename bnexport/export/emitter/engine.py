"""Pick the engine that turns a loaded model into a folded ONNX graph, and run it.

* ``"keras"`` — the Keras-native emitter (:func:`bnexport.export.emitter.emit_model`):
  Keras 3 functional/Sequential models on any backend, no TensorFlow;
* ``"tf2onnx"`` — trace to a TensorFlow graph and convert it with tf2onnx
  (:mod:`bnexport.export.trace`): also tf.keras models and SavedModels, TensorFlow only;
* ``"auto"`` (the default) — the emitter wherever it applies; a model it cannot express
  goes *whole* through tf2onnx (converting single layers through tf2onnx costs more than
  the whole model), and the report says which layer sent it there. On a non-TensorFlow
  Keras backend there is no fallback: the error names the layer.

Both engines then run the same fold passes (:mod:`bnexport.export.passes`) and give the
same input/output names, so Triton configs and ``--exclude`` lists do not depend on the
engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from bnexport.errors import ExportError
from bnexport.export.report import FoldRecord
from bnexport.stage_timer import StageTimer

Engine = Literal["auto", "keras", "tf2onnx"]
ENGINES = ("auto", "keras", "tf2onnx")


@dataclasses.dataclass
class Converted:
    """A folded ONNX graph and what is known about it, from either engine.

    Attributes:
        model: the folded ``ModelProto`` (before float16/metadata/check).
        records: fold records (emission folds first, then the passes').
        layer_outputs: ``{layer: tensor}`` valid in ``model``.
        layer_output_perms: ``{layer: perm}`` (``keras = onnx.transpose(perm)``).
        op_layers: ``{node or TF op name: layer}`` to name layers in errors.
        engine: ``"keras"`` or ``"tf2onnx"`` — the engine that ran.
        fallback_reason: why ``"auto"`` fell back to tf2onnx (``""`` otherwise).
    """

    model: Any
    records: list[FoldRecord]
    layer_outputs: dict[str, str]
    layer_output_perms: dict[str, list[int]]
    op_layers: dict[str, str]
    engine: str
    fallback_reason: str = ""


def keras_backend() -> str:
    """The Keras 3 backend in use (``"tensorflow"`` when Keras 3 is not importable)."""
    try:
        import keras

        return str(keras.backend.backend())
    except (ImportError, AttributeError):
        return "tensorflow"


def check_engine(engine: str) -> None:
    """Refuse an unknown engine name (``ExportError`` naming the choices)."""
    if engine not in ENGINES:
        raise ExportError(f"engine must be one of {ENGINES}. Received: engine={engine!r}")


def convert_model(
    loaded: Any,
    bns: list[Any],
    *,
    engine: str = "auto",
    opset: int,
    dynamic_batch: bool,
    fused_norm: str,
    keep_float16_overflow: str,
    input_shapes: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> Converted:
    """Convert and fold ``loaded`` with ``engine`` (see the module doc).

    ``timings`` receives ``emit`` (keras) or ``trace``/``freeze``/``convert`` (tf2onnx),
    then ``fold`` and ``layer_map``.

    Raises:
        ExportError: ``engine="keras"`` and the emitter cannot express the model, or
            ``"auto"`` on a non-TensorFlow backend with such a model (both name the layer);
            ``"tf2onnx"`` on a non-TensorFlow backend; what the engine itself raises.
    """
    from bnexport.export.emitter.registry import UnsupportedLayer

    check_engine(engine)
    job = _Job(
        loaded,
        bns,
        opset,
        dynamic_batch,
        fused_norm,
        keep_float16_overflow,
        input_shapes,
        {} if timings is None else timings,
    )
    backend = keras_backend() if loaded.kind == "keras" else "tensorflow"
    if engine == "tf2onnx":
        if backend != "tensorflow":
            raise ExportError(
                f"engine='tf2onnx' needs Keras's TensorFlow backend (KERAS_BACKEND={backend})"
            )
        return _via_tf2onnx(job, "")
    try:
        return _via_emitter(job)
    except UnsupportedLayer as exc:
        if engine == "keras":
            raise
        if backend != "tensorflow":
            raise ExportError(
                f"{exc}: the Keras-native exporter cannot export it, and the tf2onnx "
                f"fallback needs the TensorFlow backend (KERAS_BACKEND={backend})"
            ) from None
        reason = str(exc)
    return _via_tf2onnx(job, reason)


def _fold(model: Any, bn_nodes: dict[str, str], fused_norm: str, keep: str) -> tuple[Any, list]:
    from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report

    return fold_batchnorm_with_report(
        model, fused_norm=fused_norm, names=bn_nodes, keep_float16_overflow=keep
    )


def _fold_ir(model: Any, bn_nodes: dict[str, str], fused_norm: str, keep: str) -> tuple[Any, list]:
    """The fold passes on the emitter's ``onnx_ir`` model in place; then one serialization.

    The same pipeline and errors as :func:`~bnexport.export.passes.fold_batchnorm.
    fold_batchnorm_with_report`, without its ``ModelProto`` round trip (the weights are
    serialized once instead of three times).
    """
    import onnx_ir as ir

    from bnexport.export.passes.fold_batchnorm import fold_ir_model

    records = fold_ir_model(
        model,
        fused_norm=fused_norm,  # type: ignore[arg-type]
        names=bn_nodes,
        keep_float16_overflow=keep,  # type: ignore[arg-type]
    )
    return ir.serde.serialize_model(model), records


@dataclasses.dataclass(frozen=True)
class _Job:
    """What :func:`convert_model` asks of either engine."""

    loaded: Any
    bns: list[Any]
    opset: int
    dynamic_batch: bool
    fused_norm: str
    keep_float16_overflow: str
    input_shapes: dict[str, Any] | None
    timings: dict[str, float]


def _via_emitter(job: _Job) -> Converted:
    from bnexport.export.emitter import emit_model, layer_outputs

    timer = StageTimer(timings=job.timings)
    emitted = emit_model(
        job.loaded,
        job.bns,
        opset=job.opset,
        dynamic_batch=job.dynamic_batch,
        input_shapes=job.input_shapes,
    )
    timer.lap("emit")
    folded, pass_records = _fold_ir(
        emitted.model, emitted.bn_nodes, job.fused_norm, job.keep_float16_overflow
    )
    records = [*emitted.records, *pass_records]
    timer.lap("fold")
    mapping, perms = layer_outputs(folded, emitted, records)
    timer.lap("layer_map")
    return Converted(folded, records, mapping, perms, emitted.node_layers, "keras")


def _via_tf2onnx(job: _Job, reason: str) -> Converted:
    from bnexport.export import layer_map
    from bnexport.export.passes.layout import sink_layout_ops
    from bnexport.export.trace import trace_and_convert

    loaded = job.loaded
    extra = {"input_shapes": job.input_shapes} if job.input_shapes else {}
    traced = trace_and_convert(  # times its own trace, freeze and convert stages
        loaded,
        job.bns,
        opset=job.opset,
        dynamic_batch=job.dynamic_batch,
        timings=job.timings,
        **extra,
    )
    timer = StageTimer(timings=job.timings)
    traced.model = sink_layout_ops(traced.model, traced.bn_nodes)
    folded, records = _fold(
        traced.model, traced.bn_nodes, job.fused_norm, job.keep_float16_overflow
    )
    timer.lap("fold")
    input_layers, output_layers = {}, {}
    if loaded.is_keras:
        input_layers = {i.name: i.name for i in loaded.inputs}
        output_layers = {o.name: o.name for o in loaded.outputs if o.name in traced.layer_tensors}
    mapping, perms = layer_map.layer_outputs(
        folded, traced.layer_tensors, traced.layer_shapes, records, input_layers, output_layers
    )
    timer.lap("layer_map")
    return Converted(folded, records, mapping, perms, dict(traced.op_layers), "tf2onnx", reason)
