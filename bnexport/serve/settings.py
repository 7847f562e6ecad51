"""One settings object for the server, and the app those settings describe.

The CLI fills one :class:`ServeSettings`; the one-process server
(``serve_model(path, **settings.serve_model_kwargs())``) and every Ray Serve
replica (:mod:`bnexport.serve.ray`) take it, so a flag means the same thing on
both paths. :func:`load_app` is what a server does between reading its settings
and listening: load the models through ``bnexport.Session``, build the ASGI app,
start the JSON decode helper, warm every model up.

Nothing here imports TensorFlow, FastAPI or onnxruntime at module level.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServeSettings:
    """What ``bnexport serve`` was asked for; the fields are :func:`serve_model`'s keywords.

    See :func:`bnexport.serve.server.serve_model` for each field's meaning. With Ray
    Serve replicas, ``host``/``port``/``grpc_port`` are the addresses of Ray's HTTP and
    gRPC proxies, and ``header_timeout_s`` is not applied (Ray's proxy reads the
    request headers, see :mod:`bnexport.serve.ray`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    max_batch: int = 32
    batch_timeout_ms: float = 2.0
    batch_policy: str = "adaptive"
    token: str | None = None
    max_body_mb: float = 64.0
    instances: int = 1
    intra_op_threads: int = 0
    ort_spinning: bool = False
    memory_arena: bool = True
    arena_shrinkage: bool = True
    log_level: str = "info"
    graceful_timeout_s: float = 30.0
    max_inflight_mb: float | None = None
    max_inflight_requests: int = 256
    body_timeout_s: float | None = 60.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    warmup: bool = True
    grpc_port: int | None = None
    model_control: str = "none"
    open_metrics: bool = False

    def serve_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~bnexport.serve.server.serve_model` (all but the path)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ServeSettings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def max_body_bytes(self) -> int:
        """The request body (and gRPC message) limit in bytes."""
        return int(self.max_body_mb * (1 << 20))


def load_app(path: str | os.PathLike, settings: ServeSettings, metrics: Any = None) -> Any:
    """Load the models of ``path`` and build the app serving them, warmed up.

    Args:
        path: an ``.onnx`` file or a Triton-style repository folder.
        settings: the server's settings.
        metrics: the app's :class:`~bnexport.serve.core.metrics.ServerMetrics` (a fresh one
            by default).

    Returns:
        The ASGI app of :func:`bnexport.serve.rest.app.create_app` (its shared state is
        ``app.state``, its in-flight bound ``app.admission``).

    Raises:
        BnexportError: a model cannot be read or loaded (the message names it).
    """
    from bnexport.serve.core.logs import get_logger
    from bnexport.serve.core.repository import ModelRepository
    from bnexport.serve.core.session_options import ort_run_options, ort_session_kwargs
    from bnexport.serve.rest.app import create_app

    s = settings
    repository = ModelRepository.from_path(
        path,
        max_batch=s.max_batch,
        batch_timeout_ms=s.batch_timeout_ms,
        session_kwargs={
            "backend": s.backend,
            "device": s.device,
            "precision": s.precision,
            **ort_session_kwargs(s.backend, s.intra_op_threads, s.ort_spinning, s.memory_arena),
        },
    )
    repository.set_run_options(
        ort_run_options(s.backend, s.device, s.memory_arena, s.arena_shrinkage)
    )
    repository.warmup = s.warmup
    repository.control_mode = s.model_control
    app = create_app(
        repository,
        token=s.token,
        max_body_bytes=s.max_body_bytes,
        instances=s.instances,
        batch_policy=s.batch_policy,
        max_inflight_bytes=int(s.max_inflight_mb * (1 << 20)) if s.max_inflight_mb else None,
        max_inflight_requests=s.max_inflight_requests,
        body_timeout_s=s.body_timeout_s,
        open_metrics=s.open_metrics,
        metrics=metrics,
    )
    app.state.decoder.start()  # the JSON decode process imports while models warm up
    log = get_logger()
    for model in repository.all():
        warmed = False
        if s.warmup:
            try:
                warmed = model.warmup()
            except Exception as exc:  # noqa: BLE001 - a model may refuse zeros; still serve it
                log.warning(
                    "warm-up failed",
                    extra={
                        "fields": {"model": model.name, "version": model.version, "error": str(exc)}
                    },
                )
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": model.name,
                    "version": model.version,
                    "path": str(model.path),
                    "platform": model.platform,
                    "max_batch": model.max_batch,
                    "batch_timeout_ms": model.batch_timeout_s * 1000,
                    "warmed_up": warmed,
                }
            },
        )
    return app
