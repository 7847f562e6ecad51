"""``bnexport.export``: a Keras model (or SavedModel) to a verified ONNX graph, BNs folded.

Pipeline (each step in its own module):

1. :mod:`.loaders` — load the model (Keras 3, ``.keras``, tf.keras / ``.h5``, SavedModel);
2. :mod:`.bn_layers` — find every BN layer and compute ``scale``/``shift`` in float64;
3. the engine (:mod:`.emitter.engine`, ``engine=``): the Keras-native emitter
   (:mod:`.emitter`: Keras's functional graph straight to ONNX, NCHW inside, BNs folded as
   they are written; any Keras 3 backend), or :mod:`.trace` — trace a ``tf.function`` with
   BNs as named ``Mul``/``Add`` pairs and convert it with tf2onnx (fixes for Keras 3
   ``Sequential`` and grouped convolutions; :mod:`.layout` moves tf2onnx's layout
   ``Transpose``/``Squeeze`` from between a BN and its linear op). ``"auto"`` takes the
   emitter wherever it applies, else the whole model through tf2onnx;
4. :mod:`bnexport.export.passes` — fold every BN forward/backward, or fuse it into one node;
5. :mod:`.layer_map` — map Keras layers to the tensors carrying their outputs;
6. :mod:`.float16` — convert to float16 after folding (``dtype="float16"``);
7. ``onnx.checker`` (full check) and shape inference; :mod:`.verify` — run both, compare;
8. :mod:`bnexport.atomic_write` — write the file atomically (nothing left behind on failure).

Every stage is timed into ``ExportReport.timings`` (``load``, ``emit`` or ``trace``/
``freeze``/``convert``, ``fold``, ``layer_map``, ``check``, ``verify``, ``write``), printed by the
CLI. The graph is serialized once and those bytes are checked, run and written.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from bnexport.errors import ExportError
from bnexport.export.report import ExportReport, FoldRecord
from bnexport.stage_timer import StageTimer, op_counts

Dtype = Literal["float32", "float16"]
FusedNorm = Literal["onnx", "plugin"]
Engine = Literal["auto", "keras", "tf2onnx"]

#: what each stage does, as a progress callback reports it
_STAGE_TEXT = {
    "load": "loading the model",
    "convert": "converting to ONNX, folding batch norms",
    "float16": "converting to float16",
    "check": "checking the graph",
    "verify": "verifying against the model",
    "write": "writing",
}


def _check_options(
    opset: int, dtype: str, io_dtype: str, fused_norm: str, keep_float16_overflow: str
) -> None:
    problems = []
    if not isinstance(opset, int) or not 13 <= opset <= 21:
        problems.append(f"opset must be an int in [13, 21]. Received: opset={opset!r}")
    if dtype not in ("float32", "float16"):
        problems.append(f"dtype must be 'float32' or 'float16'. Received: dtype={dtype!r}")
    if io_dtype not in ("float32", "float16"):
        problems.append(f"io_dtype must be 'float32' or 'float16'. Received: io_dtype={io_dtype!r}")
    if dtype == "float32" and io_dtype == "float16":
        problems.append("io_dtype='float16' needs dtype='float16'")
    if fused_norm not in ("onnx", "plugin"):
        problems.append(f"fused_norm must be 'onnx' or 'plugin'. Received: {fused_norm!r}")
    if keep_float16_overflow not in ("float32", "error"):
        problems.append(
            "keep_float16_overflow must be 'float32' or 'error'. "
            f"Received: {keep_float16_overflow!r}"
        )
    if problems:
        raise ExportError("; ".join(problems))


def check_graph(
    model: Any, serialized: bytes | None = None, labels: dict[str, str] | None = None
) -> None:
    """``onnx.checker`` full check (schemas, types, strict shape inference) on ``model``.

    Graphs with ``bnexport::FusedNorm`` nodes are checked against the plugin's ONNX schema
    (``bnexport_plugins.fused_norm.onnx_node.register_onnx_schema``); if that is missing,
    they get the structural check and a lenient shape inference only.

    Args:
        model: the ``ModelProto``.
        serialized: ``model.SerializeToString()`` if the caller has it (saves a copy).
        labels: ``{node name: Keras layer}`` to name the layer of the failing node.

    Raises:
        ExportError: the graph is invalid (the checker's first message, in one line,
            naming the layer when the failing node is known).
    """
    import onnx

    full = True
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        try:
            from bnexport_plugins.fused_norm.onnx_node import register_onnx_schema

            register_onnx_schema()
        except ImportError:
            full = False
    try:
        # full_check runs shape inference with check_type=True, strict_mode=True itself
        onnx.checker.check_model(serialized or model, full_check=full)
        if not full:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        where = ""
        if labels:
            node = re.search(r"node name: ([^)\s]+)", lines[0] if lines else "")
            label = _layer_of_node(node.group(1), labels) if node else None
            where = f"layer {label!r}: " if label else ""
        first = lines[0] if lines else type(exc).__name__
        raise ExportError(f"{where}exported graph is invalid: {first}{more}") from exc


def _layer_of_node(name: str, labels: dict[str, str]) -> str | None:
    """The Keras layer whose TF op became ONNX node ``name``, if the name tells.

    Nodes tf2onnx adds itself (``Reshape__48``) carry no layer: no guess is made (an
    upstream neighbour would name the wrong layer).
    """
    from bnexport.export.trace import layer_of_op

    return layer_of_op(name, labels, sorted(set(labels.values())))


def _complete_records(records: list[FoldRecord], bn_names: list[str]) -> list[FoldRecord]:
    """Order ``records`` like the BN layers; add the layers the graph does not contain.

    A layer called twice has one record per call; a BN layer absent from the graph (its
    output unused) gets a ``kept`` record saying so.
    """
    by_name: dict[str, list[FoldRecord]] = {}
    extra: list[FoldRecord] = []
    for record in records:
        if record.name in bn_names:
            by_name.setdefault(record.name, []).append(record)
        else:
            extra.append(record)
    ordered: list[FoldRecord] = []
    for name in bn_names:
        ordered.extend(
            by_name.get(name)
            or [FoldRecord(name, "kept", None, "not part of the exported graph (output unused)")]
        )
    return ordered + extra


def _io_shapes(model: Any, which: str) -> dict[str, list[int | None]]:
    shapes = {}
    for value in getattr(model.graph, which):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


@dataclasses.dataclass(frozen=True)
class GraphStage:
    """A stage run on the checked (and verified) graph, before it is written.

    ``run(model, records)`` gets the ``ModelProto`` and the fold records and returns the
    ``ModelProto`` to write instead. The exporter knows nothing else about it: this is
    how a package above it (``bnexport.export(int8=...)``, :mod:`bnexport.compose`) adds
    quantization without the exporter importing the quantizer.

    Attributes:
        name: the key of its seconds in ``ExportReport.timings``.
        text: what it does, for the progress callback.
        run: the stage itself.
    """

    name: str
    text: str
    run: Callable[[Any, list[FoldRecord]], Any]


def export(
    model: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    dtype: Dtype = "float32",
    dynamic_batch: bool = True,
    fused_norm: FusedNorm = "onnx",
    verify: bool = True,
    io_dtype: Dtype | None = None,
    keep_float16_overflow: Literal["float32", "error"] = "float32",
    verify_batch: int = 2,
    verify_rtol: float | None = None,
    verify_atol: float | None = None,
    verify_range_rtol: float | None = None,
    seed: int = 0,
    safe_mode: bool = True,
    input_shapes: dict[str, Sequence[int | None]] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    engine: Engine = "auto",
    before_write: GraphStage | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` with batch normalization folded.

    Every BN layer is exported from its own variables in inference mode
    (``scale = γ/√(var+ε)``, ``shift = β − μ·scale``, float64) and folded into a
    neighbouring Conv/ConvTranspose/Gemm/MatMul where exact, else becomes one node.
    ``bnexport.export`` is :func:`bnexport.compose.export`: this function plus ``int8=``.

    Args:
        model: a Keras 3 or tf.keras model, or a path to a ``.keras``/``.h5`` file or a
            SavedModel directory.
        path: the ONNX file to write (atomically; its directory must exist).
        opset: ONNX default-domain opset (13–21).
        dtype: ``"float32"``, or ``"float16"`` (folded in float64/float32 first).
        dynamic_batch: symbolic batch dimension; else the model's batch size (or 1).
        fused_norm: a BN that cannot fold becomes one ONNX op (``"onnx"``) or one
            ``bnexport::FusedNorm`` node for the TensorRT plugin (``"plugin"``).
        verify: run the model and the graph (onnxruntime) on generated inputs and fail
            if they disagree beyond the dtype's tolerance (see :mod:`.verify`).
        io_dtype: dtype of float graph inputs/outputs; default ``dtype``.
        keep_float16_overflow: float16 only — ``"float32"`` keeps an op whose folded
            weights overflow float16 in float32; ``"error"`` fails naming the layer.
        verify_batch: batch size of the verification inputs when the batch is dynamic.
        verify_rtol: relative tolerance of the verification (default: the dtype's row of
            :mod:`bnexport.tolerance`).
        verify_atol: absolute tolerance of the verification (default: as ``verify_rtol``).
        verify_range_rtol: tolerance relative to each output channel's ``max|ref|`` (the
            range term of :mod:`bnexport.tolerance`; default: as ``verify_rtol``).
        seed: seed of the verification inputs.
        safe_mode: when ``model`` is a path, refuse a file that needs Python code to
            load (a ``Lambda`` layer) instead of running it; ``False`` only for files
            you trust (see :func:`bnexport.export.loaders.load_model`).
        input_shapes: ``{input name: shape}`` replacing the model's input shapes (e.g.
            ``{"image": (1, 224, 224, 3)}`` for a model built with ``(None, None, 3)``);
            ``None`` in a shape keeps that dimension dynamic. A fixed first dimension on
            every input gives a static batch; the key ``""`` names the only input. See
            :func:`bnexport.export.trace.apply_input_shapes`.
        progress: ``progress(step, done, total)`` before each stage (``step`` says what
            runs now, ``done`` of ``total`` stages are finished); for a progress bar.
        engine: ``"auto"`` (default: the Keras-native emitter wherever it applies, else
            the whole model through tf2onnx), ``"keras"`` or ``"tf2onnx"`` to force one
            (:mod:`bnexport.export.emitter.engine`); ``report.engine`` says which ran and
            ``report.fallback_reason`` why ``"auto"`` fell back.
        before_write: a :class:`GraphStage` whose graph is written instead (timed and
            announced like the others; the report describes the graph written).

    Returns:
        The :class:`~bnexport.export.report.ExportReport`; ``report.timings`` has the
        seconds of each stage: ``load``, ``emit`` (Keras-native engine) or ``trace``,
        ``freeze``, ``convert`` (tf2onnx), ``fold``,
        ``layer_map``, (``float16``), ``check``, ``verify``, (``before_write.name``),
        ``write``, and ``total``.

    Raises:
        ExportError: bad options, unwritable path (checked before anything is done),
            invalid BN statistics or a layer tf2onnx cannot convert (named), an invalid
            graph; :class:`~bnexport.errors.VerificationError` when verification fails;
            :class:`~bnexport.errors.UnsafeModelError` for a file that would run code
            while loading (``safe_mode=True``). Nothing is written in any of these cases,
            nor when ``before_write`` raises.
    """
    io_dtype = io_dtype or dtype
    _check_options(opset, dtype, io_dtype, fused_norm, keep_float16_overflow)
    from bnexport.export.emitter.engine import check_engine

    check_engine(engine)
    from bnexport.atomic_write import atomic_path, check_output_paths, check_writable

    if isinstance(model, str | os.PathLike):  # never overwrite the model being exported
        check_output_paths({"path": path}, {"model": model}, error=ExportError)
    out = check_writable(path, error=ExportError)
    plan = [
        "load",
        "convert",  # convert_model: conversion, the fold passes and the layer map
        *(["float16"] if dtype == "float16" else []),
        "check",
        *(["verify"] if verify else []),
        *([before_write.name] if before_write is not None else []),
        "write",
    ]
    texts = {**_STAGE_TEXT, **({before_write.name: before_write.text} if before_write else {})}
    timer = StageTimer(plan, progress=progress, texts=texts)

    from bnexport.export import layer_map
    from bnexport.export.bn_layers import find_bn_layers
    from bnexport.export.emitter.engine import convert_model
    from bnexport.export.loaders import load_model

    timer.announce("load")
    loaded = load_model(model, safe_mode=safe_mode)
    if input_shapes:
        from bnexport.export.trace import apply_input_shapes

        dynamic_batch = apply_input_shapes(loaded, input_shapes, dynamic_batch)
    bns = find_bn_layers(loaded.model) if loaded.is_keras else []
    timer.lap("load")

    # the engine: the Keras-native emitter, or trace + tf2onnx; then the fold passes and
    # the layer map (bnexport/export/emitter/engine.py), which time their own parts
    converted = convert_model(
        loaded,
        bns,
        engine=engine,
        opset=opset,
        dynamic_batch=dynamic_batch,
        fused_norm=fused_norm,
        keep_float16_overflow=keep_float16_overflow,
        timings=timer.timings,
    )
    folded, mapping, perms = converted.model, converted.layer_outputs, converted.layer_output_perms
    timer.lap("convert", record=False)
    records = _complete_records(converted.records, [bn.name for bn in bns])
    notes = []
    if not records:
        notes.append("the model has no batch normalization: exported without folding")

    float32_nodes: list[str] = []
    if dtype == "float16":
        from bnexport.graph.float16 import convert_to_float16

        labels = dict(converted.op_layers)
        for record in records:
            if record.target:
                labels[record.target] = f"{record.name} (folded into {record.target})"
        folded, float32_nodes = convert_to_float16(
            folded, io_dtype=io_dtype, on_overflow=keep_float16_overflow, labels=labels
        )
        if float32_nodes:
            notes.append(
                f"{len(float32_nodes)} node(s) kept in float32 (folded weights overflow "
                f"float16): {', '.join(float32_nodes)}"
            )
        timer.lap("float16")

    layer_map.write_metadata(folded, mapping, perms)
    folded.producer_name = "bnexport"
    serialized = folded.SerializeToString()  # once: checker, verification and file
    check_graph(folded, serialized, labels=converted.op_layers)
    timer.lap("check")

    result = None
    if verify:
        from bnexport.export.verify import verify as run_verify

        batch = verify_batch if dynamic_batch else (loaded.inputs[0].shape[0] or 1)
        result = run_verify(
            loaded,
            folded,
            dtype=dtype,
            batch=batch,
            seed=seed,
            serialized=serialized,
            rtol=verify_rtol,
            atol=verify_atol,
            range_rtol=verify_range_rtol,
        )
        timer.lap("verify")

    if before_write is not None:
        folded = before_write.run(folded, records)
        serialized = folded.SerializeToString()
        timer.lap(before_write.name)

    with atomic_path(out, error=ExportError) as tmp:
        Path(tmp).write_bytes(serialized)
    timer.lap("write")
    return ExportReport(
        path=str(out),
        opset=opset,
        dtype=dtype,
        io_dtype=io_dtype,
        fused_norm=fused_norm,
        dynamic_batch=dynamic_batch,
        source=loaded.kind,
        inputs=_io_shapes(folded, "input"),
        outputs=_io_shapes(folded, "output"),
        records=records,
        layer_outputs=mapping,
        layer_output_perms=perms,
        float32_nodes=float32_nodes,
        node_count=len(folded.graph.node),
        op_counts=op_counts(folded),
        verify=result,
        timings=timer.total(),
        notes=notes,
        engine=converted.engine,
        fallback_reason=converted.fallback_reason,
    )
