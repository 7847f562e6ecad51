"""Parity run: does the exported ONNX model compute what the Keras model computes?

:func:`check_parity` runs the Keras model (``training=False``, the reference) and
every requested backend on the same inputs (:mod:`bnexport.parity.feed`), compares
each output (:mod:`bnexport.parity.compare`; criterion and defaults from the one
tolerance policy, :mod:`bnexport.tolerance`) and, with ``per_layer=True``, every layer
that maps to an ONNX tensor (:mod:`bnexport.parity.per_layer`), naming the first layer
(graph order) out of tolerance. With ``training_mode=True`` it also checks each BN
layer's training-mode output against the FusedNorm ``batch_stats`` op
(:mod:`bnexport.parity.training_mode`).

An INT8 graph (``QuantizeLinear``/``DequantizeLinear`` nodes) is judged by top-1
agreement with Keras (class-score outputs, >= 99 % by default) and cosine similarity
(other outputs, >= 0.99); its per-layer results are reported, not failed (quantization
error accumulates by design), and ranked by the error each layer adds
(:mod:`bnexport.parity.quantized`) with the ONNX nodes to pass to
``bnexport quantize --exclude``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnexport import tolerance
from bnexport.errors import (
    BackendUnavailableError,
    BnexportError,
    InputError,
    UnsafeModelError,
    UsageError,
)
from bnexport.parity.compare import CHECKS, Check, Comparison, compare_arrays, resolve_tolerance
from bnexport.parity.feed import fit_feed, load_inputs, make_inputs, prepare_feed
from bnexport.parity.per_layer import (
    align,
    expose_tensors,
    inferred_layer_perms,
    layer_output_map,
    metadata_layer_perms,
    named_layers,
    probeable_layers,
)
from bnexport.parity.report import BackendResult, LayerResult, ParityReport
from bnexport.parity.runners import LAYER_PREFIX, KerasRunner, make_runner
from bnexport.runtime.io_check import tensor_infos_from_onnx

__all__ = ["check_parity", "fit_feed", "load_inputs", "load_keras_model", "make_inputs"]

BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_SAMPLES = 8


def load_keras_model(source: Any, *, safe_mode: bool = True) -> tuple[Any, str]:
    """Load the reference model: ``(keras model, description)``.

    Uses the exporter's loader (``bnexport.export.loaders.load_model``), so the
    same files are accepted: ``.keras``, ``.h5``, a tf.keras SavedModel directory
    or an in-memory model.

    Raises:
        UsageError: missing file, unsupported format, or a SavedModel without
            Keras layers (parity needs the Keras model as the reference).
    """
    from bnexport.export.loaders import load_model

    description = (
        os.fspath(source)
        if isinstance(source, str | os.PathLike)
        else getattr(source, "name", type(source).__name__)
    )
    try:
        loaded = load_model(source, safe_mode=safe_mode)
    except UnsafeModelError:
        raise  # already one line naming the layer and the opt-in
    except BnexportError as exc:
        raise UsageError(str(exc)) from exc
    if not loaded.is_keras:
        raise UsageError(
            f"{description!r} is a SavedModel without Keras layers; parity needs the Keras "
            "model (.keras, .h5 or a tf.keras SavedModel) as the reference"
        )
    return loaded.model, description


def _match_outputs(keras_names: list[str], onnx_names: list[str]) -> list[tuple[str, str]]:
    """Pair Keras outputs with ONNX outputs: by name, else by position."""
    if set(keras_names) == set(onnx_names):
        return [(n, n) for n in onnx_names]
    if len(keras_names) == len(onnx_names):
        return list(zip(keras_names, onnx_names, strict=True))
    raise InputError(
        f"cannot pair outputs: Keras has {keras_names}, the ONNX model has {onnx_names}"
    )


def _load_onnx(onnx_path: Any) -> tuple[Any, str]:
    """``(onnx.ModelProto, description)`` from a path or a ``ModelProto``."""
    import onnx

    if isinstance(onnx_path, onnx.ModelProto):
        return onnx_path, "<ModelProto>"
    if not os.path.isfile(onnx_path):
        raise UsageError(f"ONNX model not found: {os.fspath(onnx_path)}")
    from bnexport.io.onnx_file import load_onnx

    return load_onnx(onnx_path), os.fspath(onnx_path)


@dataclasses.dataclass
class _LayerPlan:
    """Which layers per-layer parity compares, with which tensor and layout."""

    layers: list[str] = dataclasses.field(default_factory=list)
    captured: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    mapping: dict[str, str] = dataclasses.field(default_factory=dict)
    perms: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    source: str | None = None


def _plan_layers(keras_model: Any, onnx_model: Any) -> _LayerPlan:
    """Map layers to ONNX tensors (exporter metadata, else names) and their layouts.

    Every layer Keras tracks is a candidate, also inside custom blocks and nested models
    (named as the exporter names them, :func:`~bnexport.parity.per_layer.named_layers`);
    those without an output in the model's graph are captured while the model runs.
    """
    by_name = named_layers(keras_model)
    mapping, source = layer_output_map(onnx_model, by_name)
    layers, skipped, captured = probeable_layers(keras_model, mapping, onnx_model, by_name)
    if source == "metadata":  # the exporter records every non-identity layout
        recorded = metadata_layer_perms(onnx_model)
        perms = {n: recorded[n] for n in layers if n in recorded}
    else:
        perms = inferred_layer_perms(onnx_model, {n: mapping[n] for n in layers})
    plan = _LayerPlan(layers, {n: by_name[n] for n in captured}, skipped, mapping, perms, source)
    return plan


@dataclasses.dataclass
class _Criterion:
    """How one backend's results are judged (resolved from the policy and the arguments)."""

    rtol: float | Mapping[str, float] | None
    atol: float | Mapping[str, float] | None
    default: tolerance.Tolerance
    check: Check
    min_top1: float
    range_rtol: float | Mapping[str, float] | None = None

    def compare(self, name: str, ref: np.ndarray, got: np.ndarray) -> Comparison:
        return compare_arrays(
            name,
            ref,
            got,
            rtol=resolve_tolerance(self.rtol, name, self.default.rtol),
            atol=resolve_tolerance(self.atol, name, self.default.atol),
            check=self.check,
            min_top1=self.min_top1,
            min_cosine=self.default.min_cosine or tolerance.INT8_MIN_COSINE,
            range_rtol=resolve_tolerance(self.range_rtol, name, self.default.range_rtol),
        )


def _criterion(
    precision: str,
    quantized: bool,
    rtol: Any,
    atol: Any,
    check: Check | None,
    min_top1: float | None,
    range_rtol: Any = None,
) -> _Criterion:
    default = tolerance.default_tolerance("int8" if quantized else precision)
    chosen = check or ("agreement" if quantized else "elementwise")
    top1 = min_top1 if min_top1 is not None else (default.min_top1 or tolerance.INT8_MIN_TOP1)
    return _Criterion(rtol, atol, default, chosen, top1, range_rtol)


def _run_backend(
    backend: str,
    probe: Any,
    feed: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    plan: _LayerPlan,
    criterion: _Criterion,
    *,
    precision: str,
    quantized: bool,
    runner_options: Mapping[str, Any],
) -> BackendResult:
    """Run one backend on ``feed`` and compare its outputs (and layers) with Keras."""
    result = BackendResult(
        backend=backend,
        precision="int8" if quantized else precision,
        layer_map_source=plan.source,
        quantized=quantized,
    )
    runner = make_runner(backend, probe, **({"precision": precision} | dict(runner_options)))
    try:
        with runner:
            got = runner.infer(feed)
            result.seconds = runner.last_inference_time
    except (BackendUnavailableError, InputError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    for keras_name, onnx_name in pairs:
        result.outputs.append(criterion.compare(onnx_name, reference[keras_name], got[onnx_name]))
    for name in plan.layers:
        tensor = plan.mapping[name]
        keras_value = reference[LAYER_PREFIX + name]
        if keras_value is None:
            reason = "called several times per forward pass (no single output)"
            result.layers.append(LayerResult(name, tensor, layout="?", skipped=reason))
            continue
        perm = plan.perms.get(name)
        if perm is None and plan.source == "metadata":  # recorded layouts only where not identity
            perm = list(range(np.ndim(keras_value)))
        aligned, layout = align(keras_value, got[tensor], perm)
        if aligned is None:
            result.layers.append(LayerResult(name, tensor, layout="?", skipped=layout))
            continue
        comparison = criterion.compare(name, keras_value, aligned)
        result.layers.append(LayerResult(name, tensor, layout, comparison))
    for name, reason in plan.skipped.items():
        result.layers.append(LayerResult(name, plan.mapping.get(name, ""), "?", skipped=reason))
    if quantized and backend == "onnxruntime":  # the quantization error beside the kernels'
        from bnexport.parity.quantized import quantization_check

        result.quantization_outputs, result.int8_note = quantization_check(
            probe, feed, reference, pairs, criterion.compare, result.top1
        )
    if quantized and result.layers:
        from bnexport.parity.quantized import rank_layer_losses

        result.layer_losses = rank_layer_losses(probe, result.layers)
    return result


def check_parity(
    model: Any,
    onnx_path: Any,
    *,
    backends: Sequence[str] = ("onnxruntime",),
    inputs: Any = None,
    samples: int = DEFAULT_SAMPLES,
    per_layer: bool = False,
    rtol: float | Mapping[str, float] | None = None,
    atol: float | Mapping[str, float] | None = None,
    check: Check | None = None,
    precision: str = "fp32",
    training_mode: bool = False,
    seed: int = 0,
    session_options: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
    min_top1: float | None = None,
    range_rtol: float | Mapping[str, float] | None = None,
) -> ParityReport:
    """Compare the Keras model with its ONNX export on every requested backend.

    Args:
        model: a Keras model, or a path the exporter's loader accepts.
        onnx_path: the exported ``.onnx`` path (or an ``onnx.ModelProto``), float or
            INT8 (QDQ).
        backends: any of ``"onnxruntime"`` (CPU) and ``"tensorrt"`` (CUDA).
        inputs: ``{input name: array}`` (ONNX or Keras input names), one array
            (single-input models, like ``x.npy``), a list of arrays (one per input),
            or a ``.npz``/``.npy`` path; ``None``: ``samples`` generated samples
            (:mod:`bnexport.sample_inputs`).
        samples: number of generated samples when ``inputs`` is ``None``.
        per_layer: also compare every layer mapped to an ONNX tensor and name
            the first one out of tolerance (INT8: rank layers by the error they add).
        rtol: relative tolerance: a float, ``{output or layer: float}`` (key ``""``
            for the rest) or ``None`` for the default of the precision
            (:mod:`bnexport.tolerance`).
        atol: absolute tolerance, same forms.
        check: pass criterion (``elementwise``, ``max``, ``mean``, ``quantile``,
            ``agreement``); ``None``: ``agreement`` for INT8 graphs, else
            ``elementwise``.
        precision: precision of the TensorRT backend (``fp32``/``fp16``); sets
            its default tolerances. onnxruntime on CPU always runs fp32.
        training_mode: also check BN layers in training mode against FusedNorm
            ``batch_stats`` (reference and onnxruntime), with each layer's own
            ghost-batch size.
        seed: seed of the generated inputs.
        session_options: extra :class:`bnexport.Session` keyword arguments for every backend.
        safe_mode: when ``model`` is a path, refuse a file whose loading would run
            Python code stored in it (a ``Lambda``); ``False`` only for trusted files.
        min_top1: top-1 agreement an INT8 graph's class-score outputs must reach
            (default :data:`bnexport.tolerance.INT8_MIN_TOP1`, 0.99).
        range_rtol: tolerance relative to each output channel's ``max|ref|`` (the range
            term of :mod:`bnexport.tolerance`), same forms as ``rtol``.

    Returns:
        A :class:`ParityReport` (truthy when parity holds).

    Raises:
        UsageError: unusable model, inputs or arguments;
            :class:`~bnexport.errors.SignatureMismatchError` (a ``UsageError``) when
            the two models do not take the same inputs (:mod:`.signature`).
    """
    from bnexport.parity.signature import check_signatures

    start = time.perf_counter()
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"backends must be among {BACKENDS}. Received: {list(backends)}")
    if check is not None and check not in CHECKS:
        raise UsageError(f"check must be one of {CHECKS}. Received: check={check!r}")
    if min_top1 is not None and not 0.0 <= float(min_top1) <= 1.0:
        raise UsageError(f"min_top1 must be in [0, 1]. Received: min_top1={min_top1!r}")
    onnx_model, onnx_desc = _load_onnx(onnx_path)
    keras_model, model_desc = (
        (model, getattr(model, "name", "keras model"))
        if not isinstance(model, str | os.PathLike)
        else load_keras_model(model, safe_mode=safe_mode)
    )
    quantized = tolerance.is_quantized(onnx_model)
    inits = {i.name for i in onnx_model.graph.initializer}
    onnx_inputs = tensor_infos_from_onnx([i for i in onnx_model.graph.input if i.name not in inits])
    check_signatures(keras_model, onnx_inputs, model_desc, onnx_desc)
    feed = prepare_feed(inputs, onnx_inputs, keras_model, samples=samples, seed=seed)
    from bnexport.runtime.io_check import batch_size

    plan = _plan_layers(keras_model, onnx_model) if per_layer else _LayerPlan()
    direct = [n for n in plan.layers if n not in plan.captured]
    with KerasRunner(
        keras_model, layer_outputs=direct, captured_layers=plan.captured
    ) as keras_runner:
        reference = keras_runner.infer(feed)
        keras_outputs = keras_runner.output_names
    pairs = _match_outputs(keras_outputs, [o.name for o in onnx_model.graph.output])
    tensors = [plan.mapping[n] for n in plan.layers]
    probe = expose_tensors(onnx_model, tensors) if tensors else onnx_model
    results = []
    for backend in backends:
        prec = precision if backend == "tensorrt" else "fp32"
        results.append(
            _run_backend(
                backend,
                probe,
                feed,
                reference,
                pairs,
                plan,
                _criterion(prec, quantized, rtol, atol, check, min_top1, range_rtol),
                precision=prec,
                quantized=quantized,
                runner_options={"model_name": onnx_desc} | dict(session_options or {}),
            )
        )
    training = None
    if training_mode:
        from bnexport.parity.training_mode import check_training_mode

        training = check_training_mode(
            keras_model,
            feed,
            rtol=rtol if isinstance(rtol, float | int) else None,
            atol=atol if isinstance(atol, float | int) else None,
        )
    return ParityReport(
        model=model_desc,
        onnx=onnx_desc,
        samples=batch_size(feed) or 1,
        inputs={k: list(v.shape) for k, v in feed.items()},
        backends=results,
        training=training,
        seconds=time.perf_counter() - start,
    )
