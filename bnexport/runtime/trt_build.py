"""Build a TensorRT engine from ONNX: the one builder of the project.

Used by the TensorRT backend of :class:`bnexport.Session`
(:class:`bnexport.runtime.trt_backend.TrtBackend`, engine cache around it), by
``bnexport triton-repo --backend tensorrt`` (through that backend) and, for an engine
file from an ``.onnx`` file, by :func:`build_engine` (which the plugin's deprecated
``bnexport_plugins.fused_norm.trt_plugin.build_engine`` forwards to). The runtime uses
the plugin; the plugin never imports the runtime (but for that one alias). Steps:

1. ``trt.init_libnvinfer_plugins`` and, for graphs with ``bnexport::FusedNorm``
   nodes, the project's plugin
   (``bnexport_plugins.fused_norm.tensorrt_plugin.register_fused_norm_plugin``);
2. precision lives in the graph (:func:`graph_for_precision`): networks are **strongly
   typed** -- TensorRT 11 removed ``BuilderFlag.FP16``/``BF16`` (weak typing, deprecated
   since 10.12) and builds every network strongly typed -- so ``precision="fp16"``
   converts a float32 graph to float16 first (:func:`bnexport.graph.float16.convert_to_float16`:
   weights and activations float16, a node whose folded weights overflow float16 kept in
   float32, graph inputs/outputs kept float32 so callers, Triton configs and the
   engine's bindings do not change). A graph already in float16 is built as it is; a
   Q/DQ (INT8) graph is never converted (its Q/DQ nodes say what runs in int8).
   ``precision="bf16"`` has no converter here: it uses ``BuilderFlag.BF16`` (weakly
   typed) where this TensorRT still has it, builds a graph that is already bfloat16 as
   it is, and is refused otherwise;
3. parse the ONNX bytes with ``trt.OnnxParser`` into a network created with
   :func:`network_flags` (explicit batch is TensorRT 10's only mode;
   ``STRONGLY_TYPED`` where the flag exists -- required on 10.x, ignored on 11.x;
   ``PREFER_AOT_PYTHON_PLUGINS`` -- or ``PREFER_JIT_...`` with ``prefer_aot=False`` --
   where this TensorRT has it, so the plugin's ahead-of-time kernel is compiled into
   the engine, which then runs without Python);
4. configure (:class:`BuildSettings`): workspace pool limit; ``BuilderFlag.TF32``
   **cleared** unless ``tf32=True`` (fp32 engines then compute in fp32, like the Keras
   and NumPy references; TF32 is allowed in strongly typed networks); one optimization
   profile per ``{input: (min, opt, max)}`` dict; a timing cache read from and written
   back to ``timing_cache`` when given;
5. ``builder.build_serialized_network``.

Errors: a parse or build failure is :class:`~bnexport.errors.ExportError` naming the
source and TensorRT's messages; TensorRT missing is ``BackendUnavailableError``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnexport.atomic_write import write_bytes_atomic
from bnexport.errors import ExportError, UsageError

Shape = tuple[int, ...]
#: ``{input name: (min shape, opt shape, max shape)}``
Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_WORKSPACE_BYTES = 1 << 30


def import_tensorrt() -> Any:
    """Import ``tensorrt`` or raise ``BackendUnavailableError`` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        from bnexport.errors import MissingExtraError
        from bnexport.extras import install_hint

        raise MissingExtraError(
            "backend='tensorrt' (and building TensorRT engines) needs the tensorrt package "
            f"({install_hint('tensorrt')})",
            name="tensorrt",
        ) from exc
    return trt


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Every builder setting that changes the engine (also part of the engine cache key).

    Attributes:
        precision: ``"fp32"``, ``"fp16"`` (the graph converted to float16, built strongly
            typed) or ``"bf16"`` (see the module docstring).
        tf32: allow TF32 math in fp32 layers (off: ``BuilderFlag.TF32`` is cleared).
        workspace_bytes: ``MemoryPoolType.WORKSPACE`` limit.
        profiles: one ``{input: (min, opt, max)}`` per optimization profile (needed for
            dynamic input dimensions).
        prefer_aot: ahead-of-time Python plugins (engine runs without Python); False
            prefers the JIT implementation.
    """

    precision: str = "fp32"
    tf32: bool = False
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    profiles: tuple[Profile, ...] = ()
    prefer_aot: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"TensorRT precision must be one of {PRECISIONS}. Received: {self.precision!r}"
            )
        if self.workspace_bytes < 1:
            raise UsageError(
                f"workspace_bytes must be >= 1. Received: workspace_bytes={self.workspace_bytes}"
            )

    def key(self, trt: Any) -> dict[str, Any]:
        """JSON-ready description of the settings (and network flags) for cache keys."""
        return {
            "network_flags": network_flags(trt, self.prefer_aot, not weak_bf16(trt, self)),
            "precision": self.precision,
            "tf32": bool(self.tf32),
            "workspace": int(self.workspace_bytes),
            "profiles": [
                {name: [list(s) for s in shapes] for name, shapes in sorted(p.items())}
                for p in self.profiles
            ],
        }


def network_flags(trt: Any, prefer_aot: bool = True, strongly_typed: bool = True) -> int:
    """Flags for ``builder.create_network``: strong typing and the Python-plugin preference.

    Each only where this TensorRT has the flag (``STRONGLY_TYPED``: 9.x-10.x, kept but
    ignored by 11.x, where every network is strongly typed). Explicit batch is TensorRT
    10's only mode (flag value 0).
    """
    flags = 0
    names = ["PREFER_AOT_PYTHON_PLUGINS" if prefer_aot else "PREFER_JIT_PYTHON_PLUGINS"]
    if strongly_typed:
        names.append("STRONGLY_TYPED")
    for name in names:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def weak_bf16(trt: Any, settings: BuildSettings) -> bool:
    """Whether this build uses ``BuilderFlag.BF16`` (weak typing): bf16 where the flag exists."""
    return settings.precision == "bf16" and hasattr(trt.BuilderFlag, "BF16")


def _float_types(model: Any) -> set[int]:
    """Element types of the graph's initializers, inputs and outputs (main graph)."""
    graph = model.graph
    types = {init.data_type for init in graph.initializer}
    for value in (*graph.input, *graph.output):
        types.add(value.type.tensor_type.elem_type)
    return types


def _uses_float16(model: Any) -> bool:
    """Whether the graph already computes in float16 (weights, I/O or a ``Cast`` to it)."""
    import onnx

    half = onnx.TensorProto.FLOAT16
    if half in _float_types(model):
        return True
    return any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute)
        for node in model.graph.node
    )


def graph_for_precision(model: Any, precision: str, trt: Any = None) -> tuple[Any, str | None]:
    """The graph to build for ``precision`` and a note on what was done (``None``: as is).

    Args:
        model: an ``onnx.ModelProto``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        trt: the ``tensorrt`` module (decides whether ``BuilderFlag.BF16`` exists).

    Raises:
        UsageError: ``precision="bf16"`` on a TensorRT without ``BuilderFlag.BF16`` for a
            graph that is not bfloat16 already.
    """
    import onnx

    from bnexport.tolerance import is_quantized

    if precision == "fp32":
        return model, None
    types = _float_types(model)
    if precision == "bf16":
        if trt is not None and hasattr(trt.BuilderFlag, "BF16"):
            return model, None  # weakly typed, BuilderFlag.BF16 (TensorRT 10)
        if onnx.TensorProto.BFLOAT16 in types:
            return model, None
        version = getattr(trt, "__version__", "?")
        raise UsageError(
            f"precision='bf16': TensorRT {version} builds strongly typed networks only "
            "(BuilderFlag.BF16 was removed in TensorRT 11) and bnexport converts graphs to "
            "float16, not bfloat16; build fp16, or convert the ONNX graph to bfloat16 first"
        )
    if onnx.TensorProto.FLOAT not in types or _uses_float16(model) or is_quantized(model):
        return model, None  # already float16 (e.g. exported with dtype="float16"), or Q/DQ
    from bnexport.graph.float16 import convert_to_float16

    io = {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    io_dtype = "float32" if onnx.TensorProto.FLOAT in io else "float16"
    converted, kept = convert_to_float16(model, io_dtype=io_dtype)
    note = f"converted to float16 ({io_dtype} inputs/outputs"
    note += f"; {len(kept)} node(s) kept in float32)" if kept else ")"
    return converted, note


def register_plugins(trt: Any, logger: Any, needs_fused_norm: bool) -> None:
    """Register TensorRT's bundled plugins and, for graphs that need it, the FusedNorm plugin.

    Raises:
        BackendUnavailableError: the plugin needs TensorRT >= 10.9 (``tensorrt.plugin``).
    """
    trt.init_libnvinfer_plugins(logger, "")
    if needs_fused_norm:
        from bnexport_plugins.fused_norm.tensorrt_plugin import register_fused_norm_plugin

        register_fused_norm_plugin()


def _configure(trt: Any, builder: Any, settings: BuildSettings) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if weak_bf16(trt, settings):
        config.set_flag(trt.BuilderFlag.BF16)
    if settings.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    for shapes in settings.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    return config


def build_serialized_engine(
    onnx_model: bytes | str | os.PathLike,
    settings: BuildSettings = BuildSettings(),  # noqa: B008 - frozen dataclass
    *,
    needs_fused_norm: bool | None = None,
    timing_cache: str | os.PathLike | None = None,
    logger: Any = None,
) -> bytes:
    """Parse an ONNX model and build a serialized TensorRT engine.

    Args:
        onnx_model: serialized ONNX bytes, or the path of an ``.onnx`` file.
        settings: builder settings (see :class:`BuildSettings`).
        needs_fused_norm: register the FusedNorm plugin; ``None`` decides from the graph
            (:func:`bnexport_plugins.fused_norm.spec.has_fused_norm`).
        timing_cache: a timing-cache file read before and written (atomically) after the
            build; TensorRT shares it between networks built with one version on one GPU.
        logger: a ``trt.Logger`` (default: warnings and errors).

    Returns:
        The serialized engine (``bytes``).

    Raises:
        ExportError: TensorRT's parser or builder failed (names the source, joins the
            parser's messages).
        BackendUnavailableError: TensorRT (or, for FusedNorm graphs, TensorRT >= 10.9)
            is missing.
        UsageError: ``precision="bf16"`` that this TensorRT cannot build (see
            :func:`graph_for_precision`).
    """
    trt = import_tensorrt()
    if isinstance(onnx_model, bytes):
        data, path, source = onnx_model, None, "the ONNX model"
    else:
        path = os.fspath(onnx_model)  # lets the parser resolve external data files
        data, source = Path(path).read_bytes(), repr(path)
    model = None
    if needs_fused_norm is None or settings.precision != "fp32":
        import onnx

        if path is None:
            model = onnx.load_from_string(data)
        else:  # weights from external data files only when the graph may be converted
            model = onnx.load(path, load_external_data=settings.precision != "fp32")
    if needs_fused_norm is None:
        from bnexport_plugins.fused_norm.spec import has_fused_norm

        needs_fused_norm = has_fused_norm(model)
    if settings.precision != "fp32":
        typed, note = graph_for_precision(model, settings.precision, trt)
        if note is not None:  # the converted graph carries its weights inline
            data, path, source = typed.SerializeToString(), None, f"{source} ({note})"
    logger = logger if logger is not None else trt.Logger(trt.Logger.WARNING)
    register_plugins(trt, logger, needs_fused_norm)
    builder = trt.Builder(logger)
    strong = not weak_bf16(trt, settings)
    network = builder.create_network(network_flags(trt, settings.prefer_aot, strong))
    parser = trt.OnnxParser(network, logger)
    if not (parser.parse(data) if path is None else parser.parse(data, path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {source}: {errors}")
    config = _configure(trt, builder, settings)
    timing = None
    if timing_cache is not None:
        path = Path(timing_cache)
        timing = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {source} (see its log above)")
    if timing is not None:
        write_bytes_atomic(Path(timing_cache), bytes(timing.serialize()), make_parents=True)
    return bytes(serialized)


def build_engine(
    onnx_model: bytes | str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    *,
    precision: str = "fp32",
    tf32: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    profiles: Sequence[Profile] = (),
    prefer_aot: bool = True,
    timing_cache: str | os.PathLike | None = None,
) -> bytes:
    """Build a serialized engine from an ONNX model (FusedNorm nodes welcome); optionally save it.

    :func:`build_serialized_engine` with its settings as keyword arguments, the FusedNorm
    plugin registered when the graph has such nodes, and the engine written atomically to
    ``engine_path`` when given.

    Args:
        onnx_model: serialized ONNX bytes, or the path of an ``.onnx`` file.
        engine_path: where to write the engine too (``None``: only returned).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (see :class:`BuildSettings`).
        tf32: allow TF32 math in fp32 layers.
        workspace_bytes: builder workspace limit.
        profiles: one ``{input: (min, opt, max)}`` per optimization profile (dynamic inputs).
        prefer_aot: ahead-of-time plugin implementations (the engine runs without Python).
        timing_cache: a timing-cache file to read and update.

    Returns:
        The serialized engine.

    Raises:
        ExportError: the parser or the builder failed (messages joined).
        BackendUnavailableError: TensorRT (for FusedNorm graphs, >= 10.9) is not installed.
        UsageError: an invalid setting (names it).
    """
    settings = BuildSettings(
        precision=precision,
        tf32=tf32,
        workspace_bytes=workspace_bytes,
        profiles=tuple(profiles),
        prefer_aot=prefer_aot,
    )
    data = build_serialized_engine(onnx_model, settings, timing_cache=timing_cache)
    if engine_path is not None:
        write_bytes_atomic(Path(engine_path), data)
    return data
