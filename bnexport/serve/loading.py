"""The composition root: from a path and :class:`ServeSettings` to a warmed-up app.

What a server process does between reading its settings and listening, written once
for the one-process server (:func:`bnexport.serve.server.serve_model`) and every Ray
Serve replica (:class:`bnexport.serve.ray.replica.BnexportReplica`):

1. :func:`prepare_process`: JSON-lines logging at the settings' level, and a short
   GIL switch interval;
2. :func:`load_repository`: the models, loaded through ``bnexport.Session`` with the
   settings' backend, device, precision and onnxruntime options;
3. :func:`load_app`: the ASGI app over that repository (token, body and in-flight
   bounds, batch policy), the JSON decode helper process started, every model warmed
   up (:func:`warm_up`).

This is the one module that knows every layer of the server (core, rest, settings);
the layers below it know nothing of it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from bnexport.serve.core.logs import configure_logging, get_logger
from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.core.session_options import ort_run_options, ort_session_kwargs
from bnexport.serve.rest.app import create_app
from bnexport.serve.settings import ServeSettings

#: GIL switch interval of a server process (Python's default is 5 ms): worker threads
#: (decoding, encoding) hand the GIL back to the event loop sooner, and a health probe
#: needs several hand-overs (select, recv, send)
SWITCH_INTERVAL_S = 0.001


def prepare_process(settings: ServeSettings) -> None:
    """Configure the server's logging and the GIL switch interval of this process."""
    configure_logging(settings.log_level)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def load_repository(path: str | os.PathLike, settings: ServeSettings) -> ModelRepository:
    """Load the models of ``path`` (an ``.onnx`` file or a repository folder) as configured.

    Raises:
        BnexportError: a model cannot be read or loaded (the message names it).
    """
    s = settings
    repository = ModelRepository.from_path(
        path,
        max_batch=s.max_batch,
        batch_timeout_ms=s.batch_timeout_ms,
        session_kwargs={
            "backend": s.backend,
            "device": s.device,
            "precision": s.precision,
            **ort_session_kwargs(
                s.backend,
                s.intra_op_threads,
                s.ort_spinning,
                s.memory_arena,
                instances=s.instances,
            ),
        },
    )
    repository.set_run_options(
        ort_run_options(s.backend, s.device, s.memory_arena, s.arena_shrinkage)
    )
    repository.warmup = s.warmup
    repository.control_mode = s.model_control
    return repository


def warm_up(repository: ModelRepository, warmup: bool = True) -> None:
    """Warm every model up (``warmup``) and log one ``model loaded`` record per model.

    A model that refuses the zero batches is still served: its failure is logged.
    """
    log = get_logger()
    for model in repository.all():
        warmed = False
        if warmup:
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
    s = settings
    repository = load_repository(path, s)
    app = create_app(
        repository,
        token=s.token,
        max_body_bytes=s.max_body_bytes,
        instances=s.instances,
        batch_policy=s.batch_policy,
        max_inflight_bytes=s.max_inflight_bytes,
        max_inflight_requests=s.max_inflight_requests,
        admission_wait_s=s.admission_wait_s,
        body_timeout_s=s.body_timeout_s,
        request_timeout_s=s.body_timeout_s,
        open_metrics=s.open_metrics,
        metrics=metrics,
    )
    app.state.decoder.start()  # the JSON decode process imports while models warm up
    warm_up(repository, s.warmup)
    return app
