"""Parity run: does the exported ONNX model compute what the Keras model computes?

:func:`check_parity` runs the Keras model (``training=False``, the reference) and
every requested backend on the same inputs, compares each output (see
:mod:`bnexport.parity.compare` for the statistics and default tolerances) and,
with ``per_layer=True``, every layer that maps to an ONNX tensor, naming the first
layer (graph order) out of tolerance. With ``training_mode=True`` it also checks
each BN layer's training-mode output against the FusedNorm ``batch_stats`` op
(:mod:`bnexport.parity.training_mode`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.errors import (
    BackendUnavailableError,
    BnexportError,
    InputError,
    UnsafeModelError,
    UsageError,
)
from bnexport.parity.compare import Check, compare_arrays, default_tolerances, resolve_tolerance
from bnexport.parity.per_layer import (
    align,
    expose_tensors,
    inferred_layer_perms,
    layer_output_map,
    metadata_layer_perms,
    probeable_layers,
)
from bnexport.parity.report import BackendResult, LayerResult, ParityReport
from bnexport.parity.runners import LAYER_PREFIX, KerasRunner, keras_input_names, make_runner
from bnexport.runtime.io_check import TensorInfo, tensor_infos_from_onnx

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


def load_inputs(source: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a feed from ``.npz`` (one array per input name) or ``.npy`` (single input).

    Raises:
        UsageError: missing file or another extension.
    """
    from bnexport.io.arrays import load_arrays

    return load_arrays(source)  # FileMissingError / ArrayFileError (UsageErrors) name the file


def make_inputs(infos: Sequence[TensorInfo], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs: ``samples`` along a dynamic batch dim; N(0, 1) floats, ints in [0, 10).

    Raises:
        UsageError: an input has a dynamic non-batch dimension (give ``inputs``).
    """
    if samples < 1:
        raise UsageError(f"samples must be >= 1. Received: samples={samples}")
    rng = np.random.default_rng(seed)
    feed = {}
    for info in infos:
        if info.shape is None:
            raise UsageError(
                f"input {info.describe()} has no shape in the graph; pass real inputs "
                "(--inputs data.npz)"
            )
        shape = list(info.shape)
        if shape and shape[0] is None:
            shape[0] = samples
        if any(d is None for d in shape):
            raise UsageError(
                f"input {info.describe()} has dynamic dimensions besides the batch; "
                "pass real inputs (--inputs data.npz)"
            )
        kind = np.dtype(info.dtype).kind
        if kind == "f":
            feed[info.name] = rng.standard_normal(shape).astype(info.dtype)
        elif kind == "b":
            feed[info.name] = rng.random(shape) > 0.5
        else:
            feed[info.name] = rng.integers(0, 10, size=shape).astype(info.dtype)
    return feed


def _fit_feed(
    feed: Mapping[str, np.ndarray], infos: Sequence[TensorInfo], keras_model: Any
) -> dict[str, Any]:
    """Name the feed after the ONNX inputs.

    An unnamed ``.npy`` array feeds the only input. A feed keyed by the Keras
    input names (the exporter's names, or the ``KerasTensor`` names of
    ``model.inputs``) is renamed position by position. Other feeds are kept as
    given (and checked against the ONNX inputs later).
    """
    onnx_names = [i.name for i in infos]
    if list(feed) == [""]:
        if len(infos) != 1:
            raise UsageError(
                f"a .npy file feeds a single-input model; this one has {len(infos)} inputs"
            )
        return {infos[0].name: feed[""]}
    if set(feed) == set(onnx_names):
        return dict(feed)
    candidates = [keras_input_names(keras_model), [str(t.name) for t in keras_model.inputs]]
    for names in candidates:
        if set(feed) == set(names) and len(names) == len(onnx_names):
            return {o: feed[k] for k, o in zip(names, onnx_names, strict=True)}
    return dict(feed)


def _match_outputs(keras_names: list[str], onnx_names: list[str]) -> list[tuple[str, str]]:
    """Pair Keras outputs with ONNX outputs: by name, else by position."""
    if set(keras_names) == set(onnx_names):
        return [(n, n) for n in onnx_names]
    if len(keras_names) == len(onnx_names):
        return list(zip(keras_names, onnx_names, strict=True))
    raise InputError(
        f"cannot pair outputs: Keras has {keras_names}, the ONNX model has {onnx_names}"
    )


def _rank(keras_model: Any, layer: str) -> int:
    return len(keras_model.get_layer(layer).output.shape)


def check_parity(
    model: Any,
    onnx_path: Any,
    *,
    backends: Sequence[str] = ("onnxruntime",),
    inputs: Mapping[str, Any] | np.ndarray | str | os.PathLike[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    per_layer: bool = False,
    rtol: float | Mapping[str, float] | None = None,
    atol: float | Mapping[str, float] | None = None,
    check: Check = "elementwise",
    precision: str = "fp32",
    training_mode: bool = False,
    seed: int = 0,
    session_options: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
) -> ParityReport:
    """Compare the Keras model with its ONNX export on every requested backend.

    Args:
        model: a Keras model, or a path the exporter's loader accepts.
        onnx_path: the exported ``.onnx`` path (or an ``onnx.ModelProto``).
        backends: any of ``"onnxruntime"`` (CPU) and ``"tensorrt"`` (CUDA).
        inputs: ``{input name: array}``, one array (single-input models), or a
            ``.npz``/``.npy`` path; ``None``:
            ``samples`` random samples (N(0, 1) floats).
        samples: number of random samples when ``inputs`` is ``None``.
        per_layer: also compare every layer mapped to an ONNX tensor and name
            the first one out of tolerance.
        rtol: relative tolerance: a float, ``{output or layer: float}`` (key ``""``
            for the rest) or ``None`` for the default of the backend's precision.
        atol: absolute tolerance, same forms.
        check: pass criterion (``elementwise``, ``max``, ``mean``, ``quantile``).
        precision: precision of the TensorRT backend (``fp32``/``fp16``); sets
            its default tolerances. onnxruntime on CPU always runs fp32.
        training_mode: also check BN layers in training mode against FusedNorm
            ``batch_stats`` (reference and onnxruntime), with each layer's own
            ghost-batch size.
        seed: seed of the random inputs.
        session_options: extra :class:`bnexport.Session` keyword arguments for every backend.
        safe_mode: when ``model`` is a path, refuse a file whose loading would run
            Python code stored in it (a ``Lambda``); ``False`` only for trusted files.

    Returns:
        A :class:`ParityReport` (truthy when parity holds).

    Raises:
        UsageError: unusable model, inputs or arguments.
    """
    import onnx

    start = time.perf_counter()
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"backends must be among {BACKENDS}. Received: {list(backends)}")
    if isinstance(onnx_path, onnx.ModelProto):
        onnx_model, onnx_desc = onnx_path, "<ModelProto>"
    else:
        if not os.path.isfile(onnx_path):
            raise UsageError(f"ONNX model not found: {os.fspath(onnx_path)}")
        from bnexport.io.onnx_file import load_onnx

        onnx_model, onnx_desc = load_onnx(onnx_path), os.fspath(onnx_path)
    keras_model, model_desc = (
        (model, getattr(model, "name", "keras model"))
        if not isinstance(model, str | os.PathLike)
        else load_keras_model(model, safe_mode=safe_mode)
    )
    inits = {i.name for i in onnx_model.graph.initializer}
    onnx_inputs = tensor_infos_from_onnx([i for i in onnx_model.graph.input if i.name not in inits])
    onnx_outputs = [o.name for o in onnx_model.graph.output]
    if inputs is None:
        feed = make_inputs(onnx_inputs, samples, seed)
    else:
        if isinstance(inputs, str | os.PathLike):
            raw = load_inputs(inputs)
        elif isinstance(inputs, np.ndarray):  # one array feeds a single-input model (as x.npy)
            raw = {"": inputs}
        else:
            raw = inputs
        feed = _fit_feed(raw, onnx_inputs, keras_model)
    from bnexport.runtime.io_check import batch_size, check_inputs

    try:
        feed = check_inputs(feed, onnx_inputs)
    except InputError as exc:
        raise UsageError(str(exc)) from exc
    n_samples = batch_size(feed) or 1

    layers: list[str] = []
    skipped: dict[str, str] = {}
    mapping: dict[str, str] = {}
    perms: dict[str, list[int]] = {}
    map_source = None
    if per_layer:
        names = [layer.name for layer in keras_model.layers]
        mapping, map_source = layer_output_map(onnx_model, names)
        layers, skipped = probeable_layers(keras_model, mapping, onnx_model)
        if map_source == "metadata":  # the exporter records every non-identity layout
            recorded = metadata_layer_perms(onnx_model)
            perms = {n: recorded.get(n, list(range(_rank(keras_model, n)))) for n in layers}
        else:
            perms = inferred_layer_perms(onnx_model, {n: mapping[n] for n in layers})
    with KerasRunner(keras_model, layer_outputs=layers) as keras_runner:
        reference = keras_runner.infer(feed)
        keras_outputs = keras_runner.output_names
    pairs = _match_outputs(keras_outputs, onnx_outputs)
    probe = expose_tensors(onnx_model, [mapping[n] for n in layers]) if layers else onnx_model

    results: list[BackendResult] = []
    for backend in backends:
        prec = precision if backend == "tensorrt" else "fp32"
        d_rtol, d_atol = default_tolerances(prec)
        result = BackendResult(backend=backend, precision=prec, layer_map_source=map_source)
        results.append(result)
        runner = make_runner(
            backend,
            probe,
            **({"precision": prec, "model_name": onnx_desc} | dict(session_options or {})),
        )
        try:
            with runner:
                got = runner.infer(feed)
                result.seconds = runner.last_inference_time
        except (BackendUnavailableError, InputError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            continue
        for keras_name, onnx_name in pairs:
            result.outputs.append(
                compare_arrays(
                    onnx_name,
                    reference[keras_name],
                    got[onnx_name],
                    rtol=resolve_tolerance(rtol, onnx_name, d_rtol),
                    atol=resolve_tolerance(atol, onnx_name, d_atol),
                    check=check,
                )
            )
        for name in layers:
            tensor = mapping[name]
            aligned, layout = align(reference[LAYER_PREFIX + name], got[tensor], perms.get(name))
            if aligned is None:
                result.layers.append(LayerResult(name, tensor, layout="?", skipped=layout))
                continue
            comparison = compare_arrays(
                name,
                reference[LAYER_PREFIX + name],
                aligned,
                rtol=resolve_tolerance(rtol, name, d_rtol),
                atol=resolve_tolerance(atol, name, d_atol),
                check=check,
            )
            result.layers.append(LayerResult(name, tensor, layout, comparison))
        for name, reason in skipped.items():
            result.layers.append(LayerResult(name, mapping.get(name, ""), "?", skipped=reason))

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
        samples=n_samples,
        inputs={k: list(v.shape) for k, v in feed.items()},
        backends=results,
        training=training,
        seconds=time.perf_counter() - start,
    )
