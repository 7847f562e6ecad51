"""Build a TensorRT engine from ONNX: the one builder of the project.

Used by the TensorRT backend of :class:`bnexport.Session`
(:class:`bnexport.runtime.trt_backend.TrtBackend`, engine cache around it), by
``bnexport triton-repo --backend tensorrt`` (through that backend) and by
:func:`bnexport_plugins.fused_norm.trt_plugin.build_engine`. Steps:

1. ``trt.init_libnvinfer_plugins`` and, for graphs with ``bnexport::FusedNorm``
   nodes, the project's plugin (``trt_plugin.register_fused_norm_plugin``);
2. parse the ONNX bytes with ``trt.OnnxParser`` into a network created with
   :func:`network_flags` (explicit batch is TensorRT 10's only mode;
   ``PREFER_AOT_PYTHON_PLUGINS`` -- or ``PREFER_JIT_...`` with ``prefer_aot=False`` --
   where this TensorRT has it, so the plugin's ahead-of-time kernel is compiled into
   the engine, which then runs without Python);
3. configure (:class:`BuildSettings`): workspace pool limit; ``BuilderFlag.FP16`` /
   ``BF16`` for ``precision="fp16"`` / ``"bf16"``; ``BuilderFlag.TF32`` **cleared**
   unless ``tf32=True`` (fp32 engines then compute in fp32, like the Keras and NumPy
   references); one optimization profile per ``{input: (min, opt, max)}`` dict; a
   timing cache read from and written back to ``timing_cache`` when given;
4. ``builder.build_serialized_network``.

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
from bnexport.errors import BackendUnavailableError, ExportError, UsageError

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
        raise BackendUnavailableError(
            "backend='tensorrt' (and building TensorRT engines) needs the tensorrt package "
            "(pip install 'bnexport[tensorrt]')"
        ) from exc
    return trt


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Every builder setting that changes the engine (also part of the engine cache key).

    Attributes:
        precision: ``"fp32"``, ``"fp16"`` (``BuilderFlag.FP16``) or ``"bf16"``
            (``BuilderFlag.BF16``); weakly typed networks pick kernels per layer.
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
            "network_flags": network_flags(trt, self.prefer_aot),
            "precision": self.precision,
            "tf32": bool(self.tf32),
            "workspace": int(self.workspace_bytes),
            "profiles": [
                {name: [list(s) for s in shapes] for name, shapes in sorted(p.items())}
                for p in self.profiles
            ],
        }


def network_flags(trt: Any, prefer_aot: bool = True) -> int:
    """Flags for ``builder.create_network``: the Python-plugin preference, where it exists.

    Explicit batch is TensorRT 10's only mode (flag value 0).
    """
    name = "PREFER_AOT_PYTHON_PLUGINS" if prefer_aot else "PREFER_JIT_PYTHON_PLUGINS"
    flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
    return 0 if flag is None else 1 << int(flag)


def register_plugins(trt: Any, logger: Any, needs_fused_norm: bool) -> None:
    """Register TensorRT's bundled plugins and, for graphs that need it, the FusedNorm plugin.

    Raises:
        BackendUnavailableError: the plugin needs TensorRT >= 10.9 (``tensorrt.plugin``).
    """
    trt.init_libnvinfer_plugins(logger, "")
    if needs_fused_norm:
        from bnexport_plugins.fused_norm.trt_plugin import register_fused_norm_plugin

        register_fused_norm_plugin()


def _configure(trt: Any, builder: Any, settings: BuildSettings) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif settings.precision == "bf16":
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
    """
    trt = import_tensorrt()
    if isinstance(onnx_model, bytes):
        data, path, source = onnx_model, None, "the ONNX model"
    else:
        path = os.fspath(onnx_model)  # lets the parser resolve external data files
        data, source = Path(path).read_bytes(), repr(path)
    if needs_fused_norm is None:
        import onnx
        from bnexport_plugins.fused_norm.spec import has_fused_norm

        needs_fused_norm = has_fused_norm(onnx.load_from_string(data))
    logger = logger if logger is not None else trt.Logger(trt.Logger.WARNING)
    register_plugins(trt, logger, needs_fused_norm)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, settings.prefer_aot))
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
