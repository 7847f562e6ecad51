"""TensorRT backend of :class:`bnexport.Session` (extra ``bnexport[tensorrt]``).

Build: once per ONNX file, TensorRT version, GPU and
:class:`~bnexport.runtime.trt_build.BuildSettings` -- and, for graphs with
``bnexport::FusedNorm``, the plugin's code (:func:`~bnexport.runtime.engine_cache.plugin_digest`)
-- (then from the engine cache, see :mod:`bnexport.runtime.engine_cache`), by the
project's one builder,
:func:`bnexport.runtime.trt_build.build_serialized_engine`: bundled plugins and, for
graphs with ``bnexport::FusedNorm``, the project's plugin registered; ahead-of-time
Python plugins preferred; TF32 cleared unless ``tf32=True``; one optimization profile
whose batch spans ``1..max_batch``; a timing cache shared per TensorRT version and GPU.
Then ``trt.Runtime.deserialize_cuda_engine``.

Run: the engine's device is made current (``cudaSetDevice``: the current device is
per thread, and a server calls ``run`` from other threads than the one that built the
engine), inputs are copied host -> device on a private CUDA stream, input shapes
set with ``IExecutionContext.set_input_shape``, every tensor address bound with
``set_tensor_address``, ``execute_async_v3`` enqueued, outputs copied back and
the stream synchronized. Device buffers grow on demand and are reused. One
execution context is not re-entrant, so ``run`` holds a lock. CUDA is reached
through :mod:`bnexport.cuda_api` (cuda-bindings' runtime API).

I/O dtypes are the engine's (:func:`numpy_dtype`): bfloat16 tensors, which
``trt.nptype`` does not map (NumPy has no bfloat16), use ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnexport.cuda_api import check as _check_cuda
from bnexport.cuda_api import handle_value
from bnexport.cuda_api import runtime as import_cudart
from bnexport.errors import BackendUnavailableError, InputError
from bnexport.runtime.engine_cache import (
    DEFAULT_TRT_MAX_BATCH,
    EngineCache,
    engine_cache_key,
    plugin_digest,
    profile_shapes,
    timing_cache_path,
)
from bnexport.runtime.io_check import TensorInfo
from bnexport.runtime.trt_build import (
    DEFAULT_WORKSPACE_BYTES,
    BuildSettings,
    build_serialized_engine,
    import_tensorrt,
    register_plugins,
)

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "TrtBackend",
    "gpu_name",
    "import_cudart",
    "import_tensorrt",
    "numpy_dtype",
]


def numpy_dtype(trt: Any, trt_dtype: Any) -> np.dtype:
    """The NumPy dtype of a TensorRT tensor type; bfloat16 as ``ml_dtypes.bfloat16``.

    ``trt.nptype`` raises ``TypeError`` for ``trt.bfloat16`` (NumPy has no such type).
    """
    if trt_dtype == getattr(trt, "bfloat16", object()):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(trt.nptype(trt_dtype))


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


class _DeviceBuffer:
    """A growable device allocation."""

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            ptr = _check_cuda(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self.ptr = handle_value(ptr)
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
        precision: ``"fp32"`` or ``"fp16"`` (the graph converted to float16 and built
            strongly typed, see :mod:`bnexport.runtime.trt_build`).
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
        self.device_id = int(device_id)
        _check_cuda(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self.device = gpu_name(cudart, device_id)
        self.shapes = profile_shapes(inputs, self.max_batch, overrides=profile_overrides)
        self.settings = BuildSettings(
            precision=precision,
            tf32=bool(tf32),
            workspace_bytes=int(workspace_bytes),
            profiles=(self.shapes,),
        )
        self.cache = cache or EngineCache()
        self.cache_key = engine_cache_key(
            model_bytes,
            trt.__version__,
            self.device,
            self.settings.key(trt),
            plugin=plugin_digest() if needs_fused_norm else None,
        )
        self._logger = trt.Logger(trt.Logger.WARNING)
        register_plugins(trt, self._logger, needs_fused_norm)
        engine_bytes = self.cache.get(self.cache_key)
        self.from_cache = engine_bytes is not None
        if engine_bytes is None:
            engine_bytes = build_serialized_engine(
                model_bytes,
                self.settings,
                needs_fused_norm=needs_fused_norm,
                timing_cache=timing_cache_path(trt.__version__, self.device, self.cache.root),
                logger=self._logger,
            )
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
            # the current device is per thread: launch where the engine was built
            _check_cuda(cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
            for name, arr in feed.items():
                dtype = numpy_dtype(trt, self.engine.get_tensor_dtype(name))
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
                dtype = numpy_dtype(trt, self.engine.get_tensor_dtype(info.name))
                out = np.empty(shape, dtype=dtype)
                ptr = self._buffer(info.name).ensure(out.nbytes)
                self.context.set_tensor_address(info.name, ptr)
                results[info.name] = out
            if not self.context.execute_async_v3(handle_value(self._stream)):
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
