"""onnxruntime backend of :class:`bnexport.Session`.

Execution providers by ``device``:

- ``"cpu"``: ``CPUExecutionProvider``.
- ``"cuda"``: ``TensorrtExecutionProvider`` (only when ``precision="fp16"`` or
  when its options are passed explicitly), then ``CUDAExecutionProvider``, then
  CPU as onnxruntime's fallback for unsupported nodes. Needs ``onnxruntime-gpu``.

Provider options are not hidden: ``providers_options`` maps a provider name to
its option dict (e.g. ``{"CUDAExecutionProvider": {"device_id": 1}}``) and is
merged over the defaults below; ``session_options`` is an
``onnxruntime.SessionOptions`` used as is. The TensorRT execution provider's engine
cache is on, in ``<engine cache>/ort-trt`` (:func:`ort_trt_cache_dir`), not in the
current directory.

No silent fallback: onnxruntime drops a GPU provider whose libraries fail to load
(CUDA/cuDNN/TensorRT missing or of another version) with a log line and runs on
CPU -- or, without the TensorRT provider, in fp32 instead of the fp16 asked for.
After the session is created, :func:`check_providers` compares
``InferenceSession.get_providers()`` with the providers asked for and raises
:class:`~bnexport.errors.BackendUnavailableError` naming what is missing.

The session itself comes from :func:`bnexport.runtime.ort_session.make_session`, the
project's one session maker: graphs that contain the project's ``bnexport::FusedNorm``
node go to the fused-norm plugin's onnxruntime paths there (on CPU
``ort_cpu.make_cpu_session``, the NumPy reference itself as an onnxruntime-extensions op,
so the numbers are the reference's; on CUDA ``lowering.lower_fused_norm``, standard ONNX
ops), and a Q/DQ graph on CPU gets the x86 int8 precision mode where it needs it. What
counts as a FusedNorm node is decided by ``bnexport_plugins.fused_norm.spec`` alone
(:func:`~bnexport_plugins.fused_norm.spec.has_fused_norm`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from bnexport_plugins.fused_norm.spec import has_fused_norm

from bnexport.errors import BackendUnavailableError, InputError
from bnexport.runtime.io_check import TensorInfo

__all__ = [
    "DEFAULT_PROVIDER_OPTIONS",
    "OrtBackend",
    "check_providers",
    "has_fused_norm",
    "ort_trt_cache_dir",
]

#: options used unless ``providers_options`` overrides them
DEFAULT_PROVIDER_OPTIONS: dict[str, dict[str, Any]] = {
    "TensorrtExecutionProvider": {"trt_engine_cache_enable": True},
    "CUDAExecutionProvider": {},
    "CPUExecutionProvider": {},
}


def ort_trt_cache_dir() -> str:
    """Folder of the TensorRT execution provider's engine cache (created on first use)."""
    from bnexport.runtime.engine_cache import cache_dir

    path = cache_dir() / "ort-trt"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def check_providers(
    session: Any, requested: list[tuple[str, dict[str, Any]]], precision: str
) -> list[str]:
    """Refuse a session that silently lost a GPU provider; returns its providers.

    Args:
        session: the ``onnxruntime.InferenceSession``.
        requested: the ``(provider, options)`` list it was created with.
        precision: the precision asked for (``"fp16"`` needs the TensorRT provider).

    Raises:
        BackendUnavailableError: a requested provider other than CPU is not among
            ``session.get_providers()`` (names it, what runs instead, and the cause).
    """
    active = list(session.get_providers())
    missing = [
        name for name, _ in requested if name != "CPUExecutionProvider" and name not in active
    ]
    if missing:
        what = (
            "fp16 would silently run in fp32"
            if precision == "fp16" and "TensorrtExecutionProvider" in missing
            else "the graph would silently run on the CPU"
        )
        raise BackendUnavailableError(
            f"onnxruntime could not load {', '.join(missing)} (running on {active}): {what}. "
            "Check that the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu was built for are "
            "installed (onnxruntime logs the library that failed to load)"
        )
    return active


def _providers(
    device: str, precision: str, providers_options: Mapping[str, Mapping[str, Any]] | None
) -> list[tuple[str, dict[str, Any]]]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    user = {k: dict(v) for k, v in (providers_options or {}).items()}
    if device == "cpu":
        names = ["CPUExecutionProvider"]
        if precision != "fp32":
            raise BackendUnavailableError(
                f"precision={precision!r} on device='cpu': onnxruntime's CPU provider runs the "
                "graph in its own dtypes; use backend='tensorrt' or device='cuda' with the "
                "TensorRT execution provider for fp16"
            )
    elif device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                "device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available; "
                f"available: {sorted(available)})"
            )
        names = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if precision == "fp16" or "TensorrtExecutionProvider" in user:
            if "TensorrtExecutionProvider" not in available:
                raise BackendUnavailableError(
                    "precision='fp16' with backend='onnxruntime' needs the TensorRT execution "
                    "provider of onnxruntime-gpu, which is not available"
                )
            names.insert(0, "TensorrtExecutionProvider")
    else:
        raise BackendUnavailableError(
            f"device must be 'cpu' or 'cuda'. Received: device={device!r}"
        )
    result = []
    for name in names:
        opts = {**DEFAULT_PROVIDER_OPTIONS.get(name, {}), **user.get(name, {})}
        if name == "TensorrtExecutionProvider":
            if precision == "fp16":
                opts.setdefault("trt_fp16_enable", True)
            if opts.get("trt_engine_cache_enable") and "trt_engine_cache_path" not in opts:
                opts["trt_engine_cache_path"] = ort_trt_cache_dir()
        result.append((name, opts))
    return result


class OrtBackend:
    """Runs an ONNX model with onnxruntime; ``run`` is thread-safe (onnxruntime's is).

    Args:
        model: the ``onnx.ModelProto`` (already loaded by the session).
        model_path: the file it came from, if any (lets onnxruntime resolve external data).
        inputs: the graph inputs.
        outputs: the graph outputs.
        device: ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"`` or ``"fp16"`` (fp16 only with the TensorRT provider).
        providers_options: ``{provider name: options}`` merged over the defaults.
        session_options: an ``onnxruntime.SessionOptions``; ``None`` for the defaults.
        model_name: how load errors name the model.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: Any,
        model_path: str | None,
        inputs: list[TensorInfo],
        outputs: list[TensorInfo],
        *,
        device: str = "cpu",
        precision: str = "fp32",
        providers_options: Mapping[str, Mapping[str, Any]] | None = None,
        session_options: Any = None,
        model_name: str | None = None,
    ) -> None:
        from bnexport.runtime.ort_session import make_session

        self.inputs = inputs
        self.outputs = outputs
        providers = _providers(device, precision, providers_options)
        self.session = make_session(
            model,
            model_path=model_path,
            providers=providers,
            session_options=session_options,
            model_name=model_name,
        )
        self.providers = check_providers(self.session, providers, precision)
        self._output_names = [o.name for o in self.outputs]

    def run(self, feed: dict[str, np.ndarray], run_options: Any = None) -> dict[str, np.ndarray]:
        """Run one batch; ``feed`` is already checked and cast.

        Args:
            feed: ``{input name: array}``.
            run_options: an ``onnxruntime.RunOptions`` for this run, or ``None``.
        """
        try:
            values = self.session.run(self._output_names, feed, run_options)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            if type(exc).__name__ == "InvalidArgument":
                raise InputError(f"onnxruntime refused the inputs: {exc}") from exc
            raise
        return dict(zip(self._output_names, values, strict=True))
