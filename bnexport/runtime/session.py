"""``bnexport.Session``: one object to run an exported model on CPU or GPU.

Example::

    sess = bnexport.Session("model.onnx")                    # onnxruntime on CPU
    probs = sess.run(x)["probs"]                             # one array for a 1-input model
    sess = bnexport.Session("model.onnx", backend="tensorrt", device="cuda",
                            precision="fp16", max_batch=64)   # TensorRT engine, cached

Backends (``backend="auto"`` picks TensorRT for ``device="cuda"`` when the
``tensorrt`` package imports, onnxruntime otherwise):

- ``onnxruntime`` (:mod:`bnexport.runtime.ort_backend`): CPU, CUDA and TensorRT
  execution providers; graphs with ``bnexport::FusedNorm`` run through the
  plugin's CPU path.
- ``tensorrt`` (:mod:`bnexport.runtime.trt_backend`): an engine built with the
  FusedNorm plugin, cached on disk.

Inputs are checked before running (see :mod:`bnexport.runtime.io_check` for the
casting rule); a batch larger than ``max_batch`` is split along axis 0, run chunk
by chunk and the outputs concatenated, which gives the same result as one run
because every sample is computed independently at inference. ``run`` is
thread-safe: onnxruntime sessions accept concurrent calls, the TensorRT backend
serializes calls on its execution context.

The runtime never imports TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from bnexport.errors import BackendUnavailableError, InputError, UsageError
from bnexport.runtime.io_check import (
    TensorInfo,
    batch_size,
    check_inputs,
    split_batches,
    tensor_infos_from_onnx,
)

Backend = Literal["auto", "onnxruntime", "tensorrt"]
Device = Literal["cpu", "cuda"]
Precision = Literal["fp32", "fp16"]

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16")


def _tensorrt_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def resolve_backend(backend: str, device: str) -> str:
    """The concrete backend for ``backend="auto"``: TensorRT on CUDA when installed."""
    if backend != "auto":
        return backend
    if device == "cuda" and _tensorrt_importable():
        return "tensorrt"
    return "onnxruntime"


def _load_model(path_or_model: Any) -> tuple[Any, str | None]:
    """Return ``(onnx.ModelProto, path or None)`` from a path, bytes or a ModelProto."""
    from bnexport.io.onnx_file import load_onnx

    model = load_onnx(path_or_model)  # a UsageError subclass naming the file or the type
    is_path = isinstance(path_or_model, str | os.PathLike)
    return model, os.fspath(path_or_model) if is_path else None


class Session:
    """Run an exported ONNX model with onnxruntime or TensorRT.

    Args:
        path_or_model_proto: path of an ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.
        backend: ``"auto"``, ``"onnxruntime"`` or ``"tensorrt"``.
        device: ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"`` or ``"fp16"`` (fp16 needs TensorRT: the backend or the
            onnxruntime TensorRT execution provider).
        max_batch: largest batch handed to the backend in one call; larger batches
            are split and re-joined. For TensorRT it is also the top of the
            optimization profile (default 32). ``None``: no splitting on onnxruntime.
        providers_options: onnxruntime only: ``{provider name: options}``.
        session_options: onnxruntime only: an ``onnxruntime.SessionOptions``. On CPU, a
            Q/DQ graph whose int8 kernels can saturate here gets onnxruntime's
            ``session.x64quantprecision=1`` (exact u8u8 kernels for those layers), added
            to these options unless they set that key (``"0"`` keeps the fast kernels);
            see :mod:`bnexport.runtime.int8_kernels`.
        trt_options: TensorRT only: extra keyword arguments of
            :class:`~bnexport.runtime.trt_backend.TrtBackend` (``tf32``,
            ``workspace_bytes``, ``device_id``, ``profile_overrides``, ``cache``).
        model_name: how error messages name the model (default: its path, or
            ``<in-memory model>``); callers that load the file themselves pass its path.

    Attributes:
        inputs: list of :class:`TensorInfo` (name, numpy dtype, shape with ``None`` if dynamic).
        outputs: list of :class:`TensorInfo`.
        backend: the backend actually used.

    Raises:
        BackendUnavailableError: the backend or device is not installed / present.
        UsageError: an invalid argument (names it and the value received).
        FileMissingError: no file at the path.
        ModelFileError: the file or bytes are not a loadable ONNX model (corrupt,
            external data outside its folder, an op onnxruntime does not know).
    """

    def __init__(
        self,
        path_or_model_proto: Any,
        *,
        backend: Backend = "auto",
        device: Device = "cpu",
        precision: Precision = "fp32",
        max_batch: int | None = None,
        providers_options: Mapping[str, Mapping[str, Any]] | None = None,
        session_options: Any = None,
        trt_options: Mapping[str, Any] | None = None,
        model_name: str | None = None,
    ) -> None:
        bad = [
            f"{arg}={value!r} (one of {choices})"
            for arg, value, choices in (
                ("backend", backend, BACKENDS),
                ("device", device, DEVICES),
                ("precision", precision, PRECISIONS),
            )
            if value not in choices
        ]
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            bad.append(f"max_batch={max_batch!r} (an int >= 1 or None)")
        if bad:
            raise UsageError("Session: invalid argument(s). Received: " + ", ".join(bad))
        model, path = _load_model(path_or_model_proto)
        initializers = {init.name for init in model.graph.initializer}
        self.inputs: list[TensorInfo] = tensor_infos_from_onnx(
            [vi for vi in model.graph.input if vi.name not in initializers]
        )
        self.outputs: list[TensorInfo] = tensor_infos_from_onnx(model.graph.output)
        self.backend = resolve_backend(backend, device)
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        if self.backend == "tensorrt":
            if device != "cuda":
                raise BackendUnavailableError("backend='tensorrt' needs device='cuda'")
            from bnexport.runtime.ort_backend import has_fused_norm
            from bnexport.runtime.trt_backend import TrtBackend

            self._impl: Any = TrtBackend(
                model.SerializeToString(),
                self.inputs,
                self.outputs,
                precision=precision,
                max_batch=max_batch,
                needs_fused_norm=has_fused_norm(model),
                **dict(trt_options or {}),
            )
            self.max_batch = self._impl.max_batch
        else:
            from bnexport.runtime.ort_backend import OrtBackend

            name = model_name or path or "<in-memory model>"
            # on CPU, make_session asks for exact u8u8 kernels where this CPU's u8s8 saturate
            self._impl = OrtBackend(
                model,
                path,
                self.inputs,
                self.outputs,
                device=device,
                precision=precision,
                providers_options=providers_options,
                session_options=session_options,
                model_name=name,
            )
            if device == "cpu":  # int8 kernels that can saturate here: one warning line
                from bnexport.runtime.int8_kernels import precision_mode_on, warn_if_saturating

                options = self._impl.session.get_session_options()
                self.int8_warning = warn_if_saturating(
                    model, name, precision_mode=precision_mode_on(options)
                )

    #: the warning logged at load when this CPU's int8 kernels can saturate on the graph
    int8_warning: str | None = None

    @property
    def input_names(self) -> list[str]:
        """Names of the model inputs, in graph order."""
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the model outputs, in graph order."""
        return [o.name for o in self.outputs]

    def run(
        self, inputs: Mapping[str, Any] | np.ndarray, *, run_options: Any = None
    ) -> dict[str, np.ndarray]:
        """Run the model.

        Args:
            inputs: ``{input name: array}``, or one array for a single-input model.
            run_options: onnxruntime only: an ``onnxruntime.RunOptions`` passed to every
                ``InferenceSession.run`` of this call (e.g. with the run config entry
                ``memory.enable_memory_arena_shrinkage``); ``None``: onnxruntime's defaults.

        Returns:
            ``{output name: np.ndarray}`` for every graph output, in graph order.

        Raises:
            InputError: unknown/missing input, wrong rank, shape or dtype.
            UsageError: ``run_options`` given to the TensorRT backend.
        """
        if run_options is not None and self.backend != "onnxruntime":
            raise UsageError(
                f"run_options is an onnxruntime option; this session runs on {self.backend!r}. "
                f"Received: run_options={run_options!r}"
            )
        feed = check_inputs(inputs, self.inputs)

        def run_one(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if run_options is None:
                return self._impl.run(chunk)
            return self._impl.run(chunk, run_options=run_options)

        if self.max_batch is None:
            return run_one(feed)
        n = batch_size(feed)
        if n is None:
            if all(a.ndim == 0 or a.shape[0] <= self.max_batch for a in feed.values()):
                return run_one(feed)
            split_batches(feed, self.max_batch)  # raises: no common batch to split along
        if n <= self.max_batch:
            return run_one(feed)
        parts = [run_one(chunk) for chunk in split_batches(feed, self.max_batch)]
        joined = {}
        for name in self.output_names:
            pieces = [p[name] for p in parts]
            if any(
                p.ndim == 0 or p.shape[0] != c
                for p, c in zip(pieces, _chunk_sizes(n, self.max_batch), strict=True)
            ):
                raise InputError(
                    f"output {name!r} has no batch dimension, so a batch of {n} cannot be split "
                    f"into max_batch={self.max_batch}; run smaller batches"
                )
            joined[name] = np.concatenate(pieces, axis=0)
        return joined

    def close(self) -> None:
        """Release backend resources (TensorRT device buffers and stream); idempotent."""
        close = getattr(self._impl, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = "; ".join(i.describe() for i in self.inputs)
        return f"Session(backend={self.backend!r}, device={self.device!r}, inputs=[{ins}])"


def _chunk_sizes(n: int, max_batch: int) -> list[int]:
    return [min(max_batch, n - start) for start in range(0, n, max_batch)]
