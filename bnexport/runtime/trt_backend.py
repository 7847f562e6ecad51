"""TensorRT backend of :class:`bnexport.Session` (extra ``bnexport[tensorrt]``).

Build (once per ONNX file, TensorRT version, GPU and flags; then from the
engine cache, see :mod:`bnexport.runtime.engine_cache`):

1. register TensorRT's own plugins and, for graphs with ``bnexport::FusedNorm``
   nodes, the project's plugin (``trt_plugin.register_fused_norm_plugin``);
2. parse the ONNX bytes with ``trt.OnnxParser`` into a network created with
   ``builder.create_network(flags)`` (explicit batch is the only mode in TensorRT 10;
   ``PREFER_AOT_PYTHON_PLUGINS`` where available, so the plugin's ahead-of-time
   kernel is compiled into the engine);
3. configure: workspace pool limit, ``BuilderFlag.FP16`` for ``precision="fp16"``,
   ``BuilderFlag.TF32`` cleared unless ``tf32=True`` (so fp32 engines compute in
   fp32, like the Keras reference), a timing cache loaded from and saved to disk,
   and one optimization profile whose batch spans ``1..max_batch``;
4. ``builder.build_serialized_network`` and ``trt.Runtime.deserialize_cuda_engine``.

Run: inputs are copied host -> device on a private CUDA stream, input shapes
set with ``IExecutionContext.set_input_shape``, every tensor address bound with
``set_tensor_address``, ``execute_async_v3`` enqueued, outputs copied back and
the stream synchronized. Device buffers grow on demand and are reused. One
execution context is not re-entrant, so ``run`` holds a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnexport.atomic_write import write_bytes_atomic
from bnexport.errors import BackendUnavailableError, InputError
from bnexport.runtime.engine_cache import (
    DEFAULT_TRT_MAX_BATCH,
    EngineCache,
    engine_cache_key,
    profile_shapes,
    timing_cache_path,
)
from bnexport.runtime.io_check import TensorInfo

DEFAULT_WORKSPACE_BYTES = 1 << 30


def import_tensorrt() -> Any:
    """Import ``tensorrt`` or raise ``BackendUnavailableError`` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend='tensorrt' needs the tensorrt package (pip install 'bnexport[tensorrt]')"
        ) from exc
    return trt


def import_cudart() -> Any:
    """Import the CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend='tensorrt' needs cuda-python (pip install 'bnexport[tensorrt]')"
            ) from exc
    return cudart


def _check_cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on a non-success code."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA call {what} failed: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def gpu_name(cudart: Any, device_id: int) -> str:
    """Name of CUDA device ``device_id`` (part of the engine cache key)."""
    count = _check_cuda(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if device_id >= count:
        raise BackendUnavailableError(f"CUDA device {device_id} requested, {count} present")
    props = _check_cuda(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name)


def register_plugins(trt: Any, logger: Any, needs_fused_norm: bool) -> None:
    """Register TensorRT's bundled plugins and, for graphs that need it, the FusedNorm plugin.

    Raises:
        BackendUnavailableError: the graph has FusedNorm nodes and the plugin cannot be
            registered (``bnexport_plugins.fused_norm.trt_plugin`` needs TensorRT >= 10.9).
    """
    trt.init_libnvinfer_plugins(logger, "")
    if not needs_fused_norm:
        return
    try:
        from bnexport_plugins.fused_norm.trt_plugin import register_fused_norm_plugin
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the graph contains bnexport::FusedNorm but its TensorRT plugin is missing: {exc}"
        ) from exc
    register_fused_norm_plugin()


def network_flags(trt: Any) -> int:
    """Network creation flags for ``builder.create_network``.

    Explicit batch is TensorRT 10's only mode (flag value 0); ``PREFER_AOT_PYTHON_PLUGINS``
    is added where this TensorRT has it, so Python plugins are compiled into the engine
    (which then runs without Python).
    """
    flags = 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
    if flag is not None:
        flags |= 1 << int(flag)
    return flags


class _DeviceBuffer:
    """A growable device allocation."""

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(_check_cuda(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self._cudart.cudaFree(self.ptr)
        self.ptr, self.nbytes = 0, 0


class TrtBackend:
    """Builds (or loads from cache) a TensorRT engine and runs it.

    Args:
        model_bytes: the serialized ONNX model.
        inputs: graph inputs (used for the optimization profile).
        outputs: graph outputs.
        precision: ``"fp32"`` or ``"fp16"``.
        max_batch: largest batch of the profile (default ``DEFAULT_TRT_MAX_BATCH``).
        device_id: CUDA device ordinal.
        tf32: allow TF32 math in fp32 layers (off by default).
        workspace_bytes: builder workspace pool limit.
        profile_overrides: ``{input: (min, opt, max)}`` for inputs with dynamic
            non-batch dimensions.
        cache: engine cache (default: :func:`~bnexport.runtime.engine_cache.cache_dir`).
        needs_fused_norm: the graph has ``bnexport::FusedNorm`` nodes (register the plugin).
    """

    name = "tensorrt"

    def __init__(
        self,
        model_bytes: bytes,
        inputs: list[TensorInfo],
        outputs: list[TensorInfo],
        *,
        precision: str = "fp32",
        max_batch: int | None = None,
        device_id: int = 0,
        tf32: bool = False,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        profile_overrides: Mapping[str, Any] | None = None,
        cache: EngineCache | None = None,
        needs_fused_norm: bool = False,
    ) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self.inputs, self.outputs = inputs, outputs
        self.max_batch = max_batch or DEFAULT_TRT_MAX_BATCH
        _check_cuda(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self.device = gpu_name(cudart, device_id)
        self.shapes = profile_shapes(inputs, self.max_batch, overrides=profile_overrides)
        flags = {
            "network_flags": network_flags(trt),
            "precision": precision,
            "tf32": bool(tf32),
            "workspace": int(workspace_bytes),
            "profile": {k: [list(s) for s in v] for k, v in self.shapes.items()},
        }
        self.cache = cache or EngineCache()
        self.cache_key = engine_cache_key(model_bytes, trt.__version__, self.device, flags)
        self._logger = trt.Logger(trt.Logger.WARNING)
        register_plugins(trt, self._logger, needs_fused_norm)
        engine_bytes = self.cache.get(self.cache_key)
        self.from_cache = engine_bytes is not None
        if engine_bytes is None:
            engine_bytes = self._build(model_bytes, precision, tf32, workspace_bytes)
            self.cache.put(self.cache_key, engine_bytes)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not deserialize the engine {self.cache.path(self.cache_key)}"
            )
        self.context = self.engine.create_execution_context()
        self._stream = _check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._lock = threading.Lock()

    # -- build ------------------------------------------------------------------------------
    def _build(self, model_bytes: bytes, precision: str, tf32: bool, workspace: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailableError(f"TensorRT's ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in self.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        timing_path = timing_cache_path(trt.__version__, self.device, self.cache.root)
        previous = timing_path.read_bytes() if timing_path.exists() else b""
        timing = config.create_timing_cache(previous)
        config.set_timing_cache(timing, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailableError("TensorRT failed to build the engine (see its log above)")
        write_bytes_atomic(timing_path, bytes(timing.serialize()), make_parents=True)
        return bytes(serialized)

    # -- run --------------------------------------------------------------------------------
    def _buffer(self, name: str) -> _DeviceBuffer:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = _DeviceBuffer(self._cudart)
        return buf

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (at most ``max_batch``); ``feed`` is already checked and cast."""
        trt, cudart = self._trt, self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            for name, arr in feed.items():
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                host = np.ascontiguousarray(arr, dtype=dtype)
                if not self.context.set_input_shape(name, host.shape):
                    lo, _, hi = self.shapes[name]
                    raise InputError(
                        f"input {name!r}: shape {host.shape} is outside the engine's profile "
                        f"[{lo} .. {hi}]"
                    )
                ptr = self._buffer(name).ensure(host.nbytes)
                _check_cuda(
                    cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self._stream),
                    "cudaMemcpyAsync(H2D)",
                )
                self.context.set_tensor_address(name, ptr)
            results: dict[str, np.ndarray] = {}
            for info in self.outputs:
                shape = tuple(self.context.get_tensor_shape(info.name))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(info.name)))
                out = np.empty(shape, dtype=dtype)
                ptr = self._buffer(info.name).ensure(out.nbytes)
                self.context.set_tensor_address(info.name, ptr)
                results[info.name] = out
            if not self.context.execute_async_v3(int(self._stream)):
                raise BackendUnavailableError("TensorRT execute_async_v3 failed")
            for name, out in results.items():
                _check_cuda(
                    cudart.cudaMemcpyAsync(
                        out.ctypes.data, self._buffers[name].ptr, out.nbytes, d2h, self._stream
                    ),
                    "cudaMemcpyAsync(D2H)",
                )
            _check_cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return results

    def close(self) -> None:
        """Free device buffers and the stream."""
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:  # pragma: no cover - depends on interpreter shutdown order
        try:
            self.close()
        except Exception:
            pass
