"""``bnexport.quantize``: float32 ONNX -> folded -> calibrated INT8 QDQ graph, measured.

Pipeline (each step in its own module):

1. refuse graphs that are float16 or already quantized (:mod:`.qdq`);
2. fold every BN with bnexport's fold pass (:func:`bnexport.fold_batchnorm_with_report`);
   a BN that cannot fold is refused unless ``allow_unfolded_bn=True``, which warns with
   the measured INT8 error (such a BN runs in float32 between ``DequantizeLinear`` and
   ``QuantizeLinear``: two extra conversions and an int8 rounding on each side);
3. validate the calibration data against the graph inputs (:mod:`.calibration`);
4. ``quant_pre_process`` (shape inference) and ``quantize_static`` (:mod:`.qdq`);
5. compare the INT8 graph with the float32 folded graph on the calibration data (or
   ``validation``): top-1 agreement, max error, SQNR (:mod:`.compare`) of the graph's own
   Q/DQ semantics (the *quantization* error, the verdict); optionally exclude the most
   sensitive nodes until a target agreement is met (:mod:`.sensitivity`);
6. measure the *kernel* error of this host's onnxruntime int8 kernels (or predict it for
   a non-VNNI CPU, :mod:`.kernel_emulation`) and check the target (:mod:`.verdict`): a
   graph below it raises :class:`~bnexport.quantize.verdict.BelowTargetError` unless
   ``keep_below_target=True``;
7. ``onnx.checker`` (full), then write atomically (nothing is written on any error).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnexport.errors import QuantizeError
from bnexport.export.report import FoldRecord
from bnexport.quantize.calibration import DEFAULT_BATCH, CalibrationSet, make_calibration_set
from bnexport.quantize.qdq import DEFAULT_OP_TYPES, QdqOptions
from bnexport.quantize.report import QuantizeReport
from bnexport.quantize.verdict import BelowTargetError
from bnexport.stage_timer import StageTimer, op_counts

#: metadata key recording how the graph was quantized
METADATA_KEY = "bnexport.quantize"
_UNFOLDED_OPS = ("BatchNormalization", "FusedNorm")


def _load(src: Any) -> tuple[Any, str]:
    """The model and how messages name it (:func:`bnexport.io.onnx_file.load_onnx`)."""
    import onnx

    from bnexport.io.onnx_file import describe, load_onnx

    if isinstance(src, onnx.ModelProto):
        return src, "<in-memory>"
    return load_onnx(src), describe(src)


def _name_nodes(model: Any) -> None:
    """Give unnamed nodes a unique name (``exclude`` and the report refer to names)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _fold(model: Any, allow_unfolded_bn: bool) -> tuple[Any, list[FoldRecord], list[str]]:
    """Fold every BN; return ``(folded, records, unfolded BN node names)``."""
    from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report

    plugin = [n.name or n.op_type for n in model.graph.node if n.op_type == "FusedNorm"]
    if plugin:
        raise QuantizeError(
            f"the graph has {len(plugin)} bnexport::FusedNorm node(s) (first {plugin[0]!r}), "
            "which onnxruntime cannot calibrate; quantize the graph exported with "
            "fused_norm='onnx'"
        )
    folded, records = fold_batchnorm_with_report(model, fused_norm="onnx")
    _name_nodes(folded)
    unfolded = [n.name for n in folded.graph.node if n.op_type in _UNFOLDED_OPS]
    if unfolded and not allow_unfolded_bn:
        reasons = {r.target: r.reason for r in records if r.target}
        listed = "; ".join(
            f"{name}" + (f" ({reasons[name]})" if reasons.get(name) else "") for name in unfolded
        )
        raise QuantizeError(
            f"{len(unfolded)} batch normalization(s) could not be folded and would run in "
            f"float32 between Q/DQ pairs: {listed}. Pass allow_unfolded_bn=True "
            "(--allow-unfolded-bn) to quantize anyway; the report then states the measured "
            "INT8 error"
        )
    return folded, records, unfolded


def _model_inputs(model: Any) -> list[Any]:
    from bnexport.runtime.io_check import tensor_infos_from_onnx

    initializers = {t.name for t in model.graph.initializer}
    return tensor_infos_from_onnx([v for v in model.graph.input if v.name not in initializers])


def _check_exclude(model: Any, exclude: Sequence[str]) -> list[str]:
    if isinstance(exclude, str):
        exclude = [exclude]
    names = {n.name for n in model.graph.node}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise QuantizeError(
            f"exclude: no node named {unknown[0]!r} in the folded graph "
            f"({len(unknown)} unknown name(s)); node names are those of the ONNX graph "
            "(see bnexport parity --per-layer or the report's quantized_nodes)"
        )
    return list(exclude)


def _check_numbers(target_agreement: float | str | None, max_exclude: int) -> None:
    if isinstance(target_agreement, str) and target_agreement != "auto":
        raise QuantizeError(
            "target_agreement must be a fraction in (0, 1], 'auto' or None. "
            f"Received: target_agreement={target_agreement!r}"
        )
    if target_agreement not in (None, "auto") and not 0.0 < float(target_agreement) <= 1.0:
        raise QuantizeError(
            f"target_agreement must be in (0, 1]. Received: target_agreement={target_agreement!r}"
        )
    if not isinstance(max_exclude, int) or max_exclude < 0:
        raise QuantizeError(f"max_exclude must be an int >= 0. Received: {max_exclude!r}")


def _finalize(model: Any, source_meta: Sequence[Any], info: dict[str, Any]) -> None:
    """Copy the float32 graph's metadata (layer map) and record how it was quantized."""
    del model.metadata_props[:]
    for prop in source_meta:
        if prop.key != METADATA_KEY:
            model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(info, sort_keys=True))
    model.producer_name = "bnexport"


def _check_graph(model: Any) -> None:
    from bnexport.io.onnx_file import check_graph_valid

    check_graph_valid(model, "quantized graph", QuantizeError)


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    """The keyword options of :func:`quantize` and :func:`quantize_model`, in one place.

    Each field is the argument of the same name of :func:`quantize` (documented there),
    with its default.
    """

    method: str = "minmax"
    per_channel: bool = True
    exclude: Sequence[str] = ()
    op_types: Sequence[str] = DEFAULT_OP_TYPES
    percentile: float = 99.999
    target: str = "tensorrt"
    validation: Any = None
    target_agreement: float | str | None = "auto"
    max_exclude: int = 8
    allow_unfolded_bn: bool = False
    batch_size: int = DEFAULT_BATCH
    keep_below_target: bool = False
    full_range_weights: bool = False


def quantize_model(
    model: Any,
    calibration: Any,
    *,
    fold_records: Sequence[FoldRecord] | None = None,
    source: str = "<in-memory>",
    **options: Any,
) -> tuple[Any, QuantizeReport]:
    """Quantize an in-memory float32 ``onnx.ModelProto``; return ``(int8 model, report)``.

    ``options`` are the keyword arguments of :func:`quantize` (:class:`QuantizeSettings`);
    ``fold_records`` are the records of an earlier fold of this graph (the exporter's),
    reported instead of this call's when this call finds nothing left to fold.

    Raises:
        TypeError: an unknown option.
    """
    from bnexport.quantize import compare, qdq, sensitivity, verdict

    settings = QuantizeSettings(**options)

    timer = StageTimer()
    qdq_options = QdqOptions(
        settings.method,
        settings.per_channel,
        tuple(settings.op_types),
        settings.percentile,
        settings.target,
        settings.full_range_weights,
    )
    qdq_options.check()
    _check_numbers(settings.target_agreement, settings.max_exclude)
    qdq.check_no_quantization(model)
    qdq.check_float32(model)

    timer.restart()  # the checks above are not a stage
    folded, records, unfolded = _fold(model, settings.allow_unfolded_bn)
    if fold_records is not None and not any(r.action != "kept" for r in records):
        records = list(fold_records)
    excluded = _check_exclude(folded, settings.exclude)
    infos = _model_inputs(folded)
    calib: CalibrationSet = make_calibration_set(calibration, infos, batch_size=settings.batch_size)
    evaluation = calib
    if settings.validation is not None:
        evaluation = make_calibration_set(
            settings.validation, infos, batch_size=settings.batch_size
        )
    timer.lap("fold")

    with tempfile.TemporaryDirectory(prefix="bnexport-quantize-") as tmp:
        workdir = Path(tmp)
        prepared = qdq.preprocess(folded, workdir)
        cache = workdir / "calibration.json"
        timer.lap("prepare")
        fp32_session = compare.make_session(folded)
        reference = compare.run_batches(fp32_session, evaluation.batches)
        del fp32_session

        def measure(int8: Any) -> list[compare.OutputMetrics]:  # the graph's Q/DQ semantics
            session = compare.make_session(int8, optimize=False)
            return compare.compare_outputs(
                compare.run_batches(session, evaluation.batches), reference
            )

        def quantize_excluding(names: Sequence[str]) -> tuple[Any, list[Any]]:
            try:
                int8 = qdq.run_quantize_static(
                    prepared, calib.reader, qdq_options, exclude=names, cache=cache, workdir=workdir
                )
            except QuantizeError:
                raise
            except Exception as exc:  # onnxruntime's errors: name the step
                raise QuantizeError(
                    f"onnxruntime.quantization failed: {type(exc).__name__}: {exc}"
                ) from exc
            return int8, measure(int8)

        int8, metrics = quantize_excluding(excluded)
        timer.lap("quantize")
        ranking: dict[str, float] = {}
        steps: list[Any] = []
        auto: list[str] = []
        agreement = compare.primary_agreement(metrics)
        search = settings.target_agreement not in (None, "auto")
        if search and (agreement is None or agreement < float(settings.target_agreement)):
            candidates = [
                name for name in qdq.qdq_summary(int8, qdq_options.op_types).quantized_nodes
            ]

            def single(node: str) -> list[Any]:
                one = qdq.run_quantize_static(
                    prepared, calib.reader, qdq_options, only=[node], cache=cache, workdir=workdir
                )
                return measure(one)

            ranking = sensitivity.rank_nodes(candidates, single)
            int8, metrics, auto, steps = sensitivity.search_exclusions(
                quantize_excluding,
                list(ranking),
                base_exclude=excluded,
                target=float(settings.target_agreement),
                max_exclude=settings.max_exclude,
                keep_best=settings.keep_below_target,
            )
            excluded = [*excluded, *auto]
            timer.lap("search")
        elif search:
            steps = [sensitivity.SearchStep(0, [], agreement, compare.mean_nmse(metrics))]
        kernel = verdict.measure_kernels(int8, evaluation.batches, reference)
        timer.lap("kernels")

    summary = qdq.qdq_summary(int8, qdq_options.op_types)
    info = {
        "method": settings.method,
        "per_channel": settings.per_channel,
        "op_types": list(settings.op_types),
        "excluded": excluded,
        "target": settings.target,
        "activations": "int8 symmetric per-tensor"
        if settings.target == "tensorrt"
        else "uint8 asymmetric per-tensor",
        "weights": ("7-bit (reduce_range) " if qdq_options.reduce_range else "")
        + "int8 symmetric "
        + ("per-channel" if settings.per_channel else "per-tensor"),
    }
    _finalize(int8, model.metadata_props, info)
    _check_graph(int8)
    report = QuantizeReport(
        source=source,
        path=None,
        method=settings.method,
        per_channel=settings.per_channel,
        op_types=list(settings.op_types),
        target=settings.target,
        fold_records=list(records),
        bn_unfolded=unfolded,
        calibration_samples=calib.num_samples,
        calibration_batches=len(calib.batches),
        eval_samples=evaluation.num_samples,
        eval_data="validation" if settings.validation is not None else "calibration",
        quantized_nodes=summary.quantized_nodes,
        float_nodes=summary.float_nodes,
        excluded=excluded,
        auto_excluded=auto,
        sensitivity=ranking,
        search=steps,
        target_agreement=settings.target_agreement if search else None,
        outputs=metrics,
        kernel_outputs=kernel.outputs,
        kernel_source=kernel.source,
        kernel_emulated=kernel.emulated,
        cpu=kernel.cpu,
        reduce_range=qdq_options.reduce_range,
        weights=summary.weights,
        tensorrt_ready=summary.tensorrt_ready,
        tensorrt_problems=summary.problems,
        node_counts={"float32": len(folded.graph.node), "int8": len(int8.graph.node)},
        op_counts=op_counts(int8),
        sizes={"float32": folded.ByteSize(), "int8": int8.ByteSize()},
    )
    if settings.validation is None:
        report.notes.append(
            "agreement measured on the calibration data (optimistic); pass validation= "
            "for held-out data"
        )
    if not summary.quantized_nodes:
        report.warnings.append(
            f"no node was quantized (no {'/'.join(settings.op_types)} with constant weights, "
            "or all excluded)"
        )
    if unfolded:
        agreement = report.top1_agreement
        cost = f"top-1 agreement {agreement:.2%}, " if agreement is not None else ""
        worst = max(metrics, key=lambda m: m.nmse) if metrics else None
        message = (
            f"{len(unfolded)} batch normalization(s) left unfolded ({', '.join(unfolded)}) "
            "run in float32 between Q/DQ pairs; measured INT8 vs float32: "
            + cost
            + (f"SQNR {worst.sqnr_db:.1f} dB on {worst.name!r}" if worst else "no outputs")
        )
        report.warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    _judge(
        report, int8, settings.target_agreement, settings.target, settings.keep_below_target, kernel
    )
    report.timings = timer.total()
    return int8, report


def _judge(
    report: QuantizeReport,
    int8: Any,
    target_agreement: float | str | None,
    target: str,
    keep_below_target: bool,
    kernel: Any,
) -> None:
    """Warn when the kernels lose accuracy; check the target (:mod:`.verdict`)."""
    from bnexport.quantize import verdict

    message = verdict.kernel_warning(int8, report.outputs, kernel, target)
    if message is not None:
        report.warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=4)
    goal, origin = verdict.resolve_target(target_agreement, report.outputs, report.eval_samples)
    report.verdict_target, report.verdict_target_origin = goal, origin
    if goal is None:
        return
    where = f"(the Q/DQ graph, on {report.eval_samples} {report.eval_data} samples)"
    judged = report.top1_agreement
    if target == "cpu" and kernel.top1_agreement is not None and judged is not None:
        if kernel.top1_agreement < judged:  # a CPU graph must hold on the CPU's kernels
            judged = kernel.top1_agreement
            where = f"({kernel.source}, on {report.eval_samples} {report.eval_data} samples)"
    if judged is not None and judged >= goal:
        return
    text = verdict.below_target_message(judged, goal, origin, where=where, target_kind=target)
    report.below_target = True
    if not keep_below_target:
        raise BelowTargetError(text, report)
    report.warnings.append(text.replace("; nothing was written", "; kept (keep_below_target)"))


def quantize(
    src: str | os.PathLike[str] | Any,
    dst: str | os.PathLike[str],
    calibration: Any,
    **options: Any,
) -> QuantizeReport:
    """Fold, calibrate and quantize a float32 ONNX graph to an INT8 QDQ graph at ``dst``.

    The result runs on onnxruntime (int8 kernels on CPU) and, with the default
    ``target="tensorrt"``, has the form TensorRT's explicit quantization takes: int8
    symmetric per-channel weights, int8 symmetric per-tensor activations (zero point 0),
    float bias, Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul (see
    :mod:`bnexport.quantize.qdq`).

    Two errors are reported (:mod:`bnexport.quantize.verdict`): the quantization error
    (the graph's Q/DQ semantics, host-independent: the verdict) and the kernel error of
    this host's onnxruntime int8 kernels (on x86 CPUs without VNNI they saturate on
    8-bit weights; ``target="cpu"`` uses 7-bit weights, which cannot).

    Args:
        src: the float32 ONNX file (or an ``onnx.ModelProto``).
        dst: the INT8 file to write (atomically; not ``src``).
        calibration: an array (single-input model), a dict ``{input name: array}``, or an
            iterable of those (batches); see :mod:`bnexport.quantize.calibration`.
        **options: the keyword options that follow (:class:`QuantizeSettings`).
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` calibration.
        per_channel: per-output-channel weight scales.
        exclude: node names kept in float32 (e.g. the worst layers of
            ``bnexport parity --per-layer``).
        op_types: op types whose inputs get Q/DQ.
        percentile: kept percentile of ``|x|`` for ``method="percentile"``.
        target: ``"tensorrt"`` (default; symmetric int8 activations and 8-bit weights;
            onnxruntime runs it too, exactly on CPUs with VNNI/AVX-VNNI/AMX) or ``"cpu"``
            (uint8 asymmetric activations and 7-bit weights: correct on every x86 CPU,
            refused by TensorRT); see :class:`bnexport.quantize.qdq.QdqOptions`.
        validation: data to measure the INT8 graph on (same forms as ``calibration``);
            default: the calibration data.
        target_agreement: a fraction: keep the most sensitive nodes in float32, one more
            at a time, until the top-1 agreement of the Q/DQ graph with the float32 graph
            reaches it. ``"auto"`` (default): no search; a classifier evaluated on at
            least 100 rows must reach 0.99. ``None``: no target.
        max_exclude: most nodes the search may exclude.
        allow_unfolded_bn: quantize even if a BN cannot fold (warns with the measured error).
        batch_size: calibration batch size when the batch dimension is dynamic.
        keep_below_target: write (and return) a graph below its target agreement,
            with a warning, instead of raising.
        full_range_weights: ``target="cpu"`` with 8-bit weights (correct only on CPUs
            with VNNI/AVX-VNNI/AMX).

    Returns:
        The :class:`~bnexport.quantize.report.QuantizeReport`.

    Raises:
        CalibrationError: empty calibration data, or a wrong input name, shape or dtype
            (the input is named). Nothing is written.
        OutputPathError: ``dst`` is the ``src`` file.
        FileMissingError, ModelFileError: ``src`` is missing or not a readable ONNX file.
        QuantizeError: ``dst`` is unwritable, bad options, an unknown
            ``exclude`` name, an unfolded BN without ``allow_unfolded_bn``, a float16 or
            already-quantized graph, an unmet ``target_agreement``
            (:class:`~bnexport.quantize.verdict.BelowTargetError`, with the report, unless
            ``keep_below_target``). Nothing is written.
        TypeError: an unknown keyword option (before any work).
    """
    from bnexport.atomic_write import check_output_paths, check_writable, write_bytes_atomic

    QuantizeSettings(**options)  # an unknown option fails before any work
    src_path = src if isinstance(src, (str, os.PathLike)) else None
    check_output_paths({"dst": dst}, {"src": src_path})
    model, source = _load(src)
    out = check_writable(dst, error=QuantizeError)
    int8, report = quantize_model(model, calibration, source=source, **options)
    timer = StageTimer(timings=report.timings)
    write_bytes_atomic(out, int8.SerializeToString(), error=QuantizeError)
    timer.lap("write")
    report.path = str(out)
    return report
