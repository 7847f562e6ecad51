"""The one way the project makes an ``onnxruntime.InferenceSession``.

Every caller that runs an ONNX graph on onnxruntime goes through :func:`make_session`:
:class:`bnexport.Session` (through :class:`~bnexport.runtime.ort_backend.OrtBackend`),
the exporter's check (:mod:`bnexport.export.verify`), the quantizer's measurements
(:mod:`bnexport.quantize.compare`), training-mode parity
(:mod:`bnexport.parity.training_mode`) and the tests (``tests/support/onnx_run.py``).
What it settles once:

- the model comes as a path, bytes or an ``onnx.ModelProto``; a path is handed to
  onnxruntime as a path (it resolves external data next to the file), and a file that
  cannot be loaded is one :class:`~bnexport.errors.ModelFileError` line naming it
  (:mod:`bnexport.io.onnx_file`);
- a graph with ``bnexport::FusedNorm`` nodes (what counts is
  :func:`bnexport_plugins.fused_norm.spec.has_fused_norm`) runs through the plugin: on
  the CPU provider alone, ``ort_cpu.make_cpu_session`` (the NumPy reference as an
  onnxruntime-extensions op, else the lowering); with a GPU provider,
  ``lowering.lower_fused_norm`` (standard ONNX ops every provider runs);
- ``optimize=False`` is ``ORT_DISABLE_ALL``: tests of graph passes compare against
  onnxruntime without its own fusions, which would otherwise hide a broken fold, and the
  quantizer runs Q/DQ nodes as written;
- ``threads`` is the intra-op thread count (inter-op 1: the graph runs sequentially);
- on the CPU provider, a Q/DQ graph whose int8 kernels can saturate on this x86 CPU gets
  onnxruntime's exact u8u8 kernels (:func:`bnexport.runtime.int8_kernels.apply_precision_mode`),
  unless ``exact_int8=False`` (the quantizer measures the host's raw kernels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

#: ``providers`` entries: a provider name, or ``(name, options)``
Provider = str | tuple[str, dict[str, Any]]

CPU_PROVIDER = "CPUExecutionProvider"


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _load(model: Any, model_path: str | os.PathLike | None) -> tuple[Any, str | None]:
    """``(onnx.ModelProto, path or None)`` from a path, bytes or a ModelProto."""
    from bnexport.io.onnx_file import load_onnx

    loaded = load_onnx(model)  # a UsageError subclass naming the file or the type
    if isinstance(model, str | os.PathLike):
        model_path = model
    return loaded, os.fspath(model_path) if model_path is not None else None


def _serialized(model: Any, proto: Any) -> bytes:
    """The model's bytes: the caller's own when it gave bytes, else the proto serialized."""
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    return proto.SerializeToString()


def configure_options(
    options: Any = None, *, optimize: bool = True, threads: int | None = None
) -> Any:
    """``options`` (or new ``onnxruntime.SessionOptions``) with the optimization level and threads.

    Args:
        options: the caller's options, changed in place; ``None`` makes new ones.
        optimize: ``False`` sets ``ORT_DISABLE_ALL``; ``True`` leaves the level as it is.
        threads: intra-op threads (and 1 inter-op thread); ``None`` leaves them as they are.
    """
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def make_session(
    model: Any,
    *,
    optimize: bool = True,
    threads: int | None = None,
    providers: Sequence[Provider] | None = None,
    session_options: Any = None,
    exact_int8: bool = True,
    model_name: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (see the module docstring).

    Args:
        model: path of an ``.onnx`` file, its bytes, or an ``onnx.ModelProto`` (not modified).
        optimize: onnxruntime's graph optimizations (``False``: ``ORT_DISABLE_ALL``).
        threads: intra-op threads (``None``: onnxruntime's default, or what
            ``session_options`` says).
        providers: execution providers, names or ``(name, options)`` pairs, in priority
            order (default: ``["CPUExecutionProvider"]``).
        session_options: an ``onnxruntime.SessionOptions`` to start from (changed in place
            by ``optimize``/``threads``/``exact_int8``).
        exact_int8: on the CPU provider alone, set onnxruntime's x86 precision mode where
            the graph's int8 kernels can saturate here (a caller's own setting of
            :data:`~bnexport.runtime.int8_kernels.PRECISION_MODE_KEY` wins).
        model_name: how errors name the model (default: its path, or ``<in-memory model>``).
        model_path: the file a ``ModelProto`` was read from, if any: onnxruntime then
            loads that file (resolving its external data) instead of the serialized proto.

    Returns:
        The session; ``get_session_options()`` tells whether the precision mode is on
        (:func:`~bnexport.runtime.int8_kernels.precision_mode_on`).

    Raises:
        FileMissingError: no file at the path.
        ModelFileError: not a loadable ONNX model, or onnxruntime refuses it (one line,
            naming the model).
        PluginError: a FusedNorm node with bad attributes or static shapes.
        BackendUnavailableError: FusedNorm with ``onnxruntime-extensions`` asked for but
            missing, or an execution provider onnxruntime cannot create.
    """
    import onnxruntime as ort
    from bnexport_plugins.fused_norm.spec import has_fused_norm

    from bnexport.io.onnx_file import onnxruntime_load_errors

    proto, path = _load(model, model_path)
    providers = list(providers) if providers else [CPU_PROVIDER]
    cpu_only = all(_provider_name(p) == CPU_PROVIDER for p in providers)
    needs_options = session_options is not None or not optimize or threads
    options = (
        configure_options(session_options, optimize=optimize, threads=threads)
        if needs_options
        else None
    )
    if exact_int8 and cpu_only:
        from bnexport.runtime.int8_kernels import apply_precision_mode

        options, _ = apply_precision_mode(proto, options)
    with onnxruntime_load_errors(model_name or path or "<in-memory model>"):
        if not has_fused_norm(proto):
            source = path if path is not None else _serialized(model, proto)
            return ort.InferenceSession(source, sess_options=options, providers=providers)
        if cpu_only:
            from bnexport_plugins.fused_norm.ort_cpu import make_cpu_session

            return make_cpu_session(proto, sess_options=options, providers=providers)
        from bnexport_plugins.fused_norm.lowering import lower_fused_norm

        lowered = lower_fused_norm(proto).SerializeToString()
        return ort.InferenceSession(lowered, sess_options=options, providers=providers)
