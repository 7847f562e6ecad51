"""FastAPI app factory: the KServe v2 (Open Inference Protocol) HTTP endpoints.

Endpoints::

    GET  /v2/health/live                                  server live
    GET  /v2/health/ready                                 server ready (200 / 400)
    GET  /v2                                              server metadata
    GET  /v2/models/{name}[/versions/{version}]           model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready     model ready (200 / 400)
    GET  /v2/models/{name}[/versions/{version}]/config    Triton-style model config (JSON)
    POST /v2/models/{name}[/versions/{version}]/infer     inference (JSON and binary tensors)
    GET  /metrics                                         Prometheus metrics

Every error is a KServe error body ``{"error": "..."}``: 400 malformed request
(HTTP framing included) or wrong input, 401 auth, 404 unknown model/route, 408
headers or body too slow, 413 body over the limit, 415 unknown Content-Encoding,
500 the model failed on this request (only this one), 503 shutting down or the
in-flight bound is full (with ``Retry-After``); a client that leaves before its
body arrived is logged and counted as 499. The
request body may be ``gzip``/``deflate`` encoded (``Content-Encoding``), as
``tritonclient`` sends it with ``request_compression_algorithm``; the decoded
size counts against the limit.

:func:`create_app` only assembles: the shared :class:`ServerState`, the error
handlers, one router per group of endpoints (health and metadata here,
inference in :mod:`bnexport.serve.rest.infer`), and the ASGI guard in front
(:mod:`bnexport.serve.rest.middleware`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bnexport import __version__
from bnexport.serve.core.admission import Admission
from bnexport.serve.core.batcher import DynamicBatcher
from bnexport.serve.core.logs import get_logger
from bnexport.serve.core.metrics import ServerMetrics
from bnexport.serve.core.repository import ModelRepository, ServedModel
from bnexport.serve.protocol.errors import ServeError
from bnexport.serve.protocol.types import (
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
)
from bnexport.serve.rest.decode_process import DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES, DecodeProcess
from bnexport.serve.rest.infer import _ERRORS, add_infer_routes, error_response, read_body
from bnexport.serve.rest.middleware import GuardMiddleware
from bnexport.serve.rest.routes_triton import EXTENSIONS as TRITON_EXTENSIONS
from bnexport.serve.rest.routes_triton import triton_router

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerState", "create_app", "error_response", "read_body"]

DEFAULT_MAX_BODY_BYTES = 64 << 20
#: requests with a body processed at once (more wait, then 503)
DEFAULT_MAX_INFLIGHT_REQUESTS = 256
#: body bytes processed at once, as a multiple of the body limit (more wait, then 503)
DEFAULT_INFLIGHT_BODIES = 4
#: time to receive a whole request body (408 after)
DEFAULT_BODY_TIMEOUT_S = 60.0
#: models whose runs average less than this run on the event loop (no thread handoff)
INLINE_BELOW_S = 200e-6


class ServerState:
    """Everything the endpoints share: models, batchers, metrics, readiness."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        instances: int,
        batch_policy: str = "adaptive",
        decoder: DecodeProcess | None = None,
    ):
        self.repository = repository
        self.decoder = decoder or DecodeProcess()
        self.batch_policy = batch_policy
        self.metrics = metrics
        self.instances = instances
        self.ready = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self._batchers: dict[tuple[str, str], DynamicBatcher] = {}

    def batcher(self, model: ServedModel) -> DynamicBatcher:
        """The batcher of ``model``, created on first use in the running loop."""
        key = (model.name, model.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = DynamicBatcher(
                model.run,
                max_batch=model.max_batch,
                timeout_s=model.batch_timeout_s,
                workers=self.instances,
                on_batch=self.metrics.batch_hook(*key),
                on_queue=self.metrics.queue_hook(*key),
                policy=self.batch_policy,
                inline_below_s=INLINE_BELOW_S,
                stats=model.stats,
            )
            self._batchers[key] = batcher
        return batcher

    def release(self, model: ServedModel) -> DynamicBatcher | None:
        """Forget the batcher of ``model`` (unloaded or replaced); the caller closes it."""
        return self._batchers.pop((model.name, model.version), None)

    def begin_drain(self) -> None:
        """Shutdown has begun: report not ready, run queued batches without waiting."""
        self.ready = False
        for batcher in self._batchers.values():
            batcher.flush()

    async def drain(self) -> None:
        """Stop being ready; run every queued request; stop the batchers."""
        self.ready = False
        for batcher in list(self._batchers.values()):
            await batcher.close()
        await asyncio.to_thread(self.decoder.close)


def create_app(
    repository: ModelRepository,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    instances: int = 1,
    batch_policy: str = "adaptive",
    metrics: ServerMetrics | None = None,
    max_inflight_bytes: int | None = None,
    max_inflight_requests: int = DEFAULT_MAX_INFLIGHT_REQUESTS,
    admission_wait_s: float = 10.0,
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
    json_process_min_bytes: int = DEFAULT_MIN_BYTES,
    open_metrics: bool = False,
    json_max_bytes: int = DEFAULT_MAX_BYTES,
) -> Any:
    """Build the ASGI app serving ``repository``.

    Args:
        repository: the loaded models.
        token: bearer token required on every path but ``/v2/health/*``.
        max_body_bytes: largest request body (after decompression), else 413.
        instances: batches of one model that may run at the same time.
        batch_policy: ``"adaptive"`` or ``"window"`` (see :mod:`bnexport.serve.core.batcher`).
        metrics: metric set (a fresh one by default).
        max_inflight_bytes: request-body bytes processed at once (default: 4 bodies of
            ``max_body_bytes``); requests beyond wait, then get 503 + ``Retry-After``
            (see :mod:`bnexport.serve.core.admission`).
        max_inflight_requests: requests with a body processed at once (same rule).
        admission_wait_s: how long a request may wait for room before its 503.
        body_timeout_s: time to receive a whole body, else 408 (``None``: no limit).
        json_process_min_bytes: JSON bodies this large are parsed in a helper process
            (see :mod:`bnexport.serve.rest.decode_process`).
        open_metrics: serve ``GET /metrics`` without the token (annotation-based
            Prometheus scraping sends none; see :mod:`bnexport.serve.rest.middleware`).
        json_max_bytes: largest JSON text decoded (a parse peaks near 20x it), else 413;
            binary tensors are bounded by ``max_body_bytes`` alone.

    Returns:
        The ASGI app (FastAPI wrapped in :class:`GuardMiddleware`); the FastAPI
        instance is ``app.fastapi`` and the shared state ``app.state``.
    """
    if batch_policy not in ("adaptive", "window"):
        raise ValueError(f"batch_policy must be 'adaptive' or 'window'. Received: {batch_policy!r}")
    state = ServerState(
        repository,
        metrics or ServerMetrics(),
        instances,
        batch_policy,
        decoder=DecodeProcess(json_process_min_bytes, json_max_bytes),
    )
    admission = Admission(
        max_inflight_bytes or DEFAULT_INFLIGHT_BODIES * max_body_bytes,
        max_inflight_requests,
        max_wait_s=admission_wait_s,
    )
    api = FastAPI(
        title="bnexport server",
        version=__version__,
        description="KServe v2 / Open Inference Protocol over HTTP/REST.",
        lifespan=_lifespan(state),
    )
    _add_error_handlers(api)
    # -- routers: one line per group of endpoints --------------------------------------------
    add_infer_routes(api, state, max_body_bytes)  # on the app itself: the hot path matches first
    api.include_router(health_router(state))
    api.include_router(triton_router(state))  # before metadata: /v2/models/stats
    api.include_router(metadata_router(state))
    # ------------------------------------------------------------------------------------------
    app = GuardMiddleware(
        api,
        token=token,
        max_body_bytes=max_body_bytes,
        logger=get_logger(),
        admission=admission,
        body_timeout_s=body_timeout_s,
        open_metrics=open_metrics,
    )
    app.fastapi = api  # type: ignore[attr-defined]
    app.state = state  # type: ignore[attr-defined]
    app.admission = admission  # type: ignore[attr-defined]
    return app


def _lifespan(state: ServerState) -> Any:
    """Lifespan of the app: note the running loop; on shutdown drain the batchers."""
    log = get_logger()

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI):
        state.loop = asyncio.get_running_loop()
        await warm_routes(api)
        log.info("ready", extra={"fields": {"models": state.repository.names()}})
        yield
        log.info("draining")
        await state.drain()
        log.info("stopped")

    return lifespan


async def warm_routes(api: FastAPI) -> None:
    """Send the app a request for an unknown path, then one per health endpoint, in process.

    FastAPI builds the matching state of an included router (pydantic schemas of every
    route) on the first request that reaches it, and inspects an endpoint's source on
    its first call: 150+ ms on the event loop, which would land on the first client
    request, or on a health probe next to it. Nothing here is logged or counted.
    """

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: dict) -> None:
        pass

    for path in ("/_bnexport_warm_routes", "/v2/health/live", "/v2/health/ready"):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [],
            "client": None,
            "server": None,
        }
        await api(scope, receive, send)


def _add_error_handlers(api: FastAPI) -> None:
    """Every error leaves as a KServe error body ``{"error": "..."}``."""

    @api.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), exc.headers or None)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(400, f"{where}: {first['msg']}")


def health_router(state: ServerState) -> APIRouter:
    """``/v2/health/live`` and ``/v2/health/ready``: answered on the event loop, no I/O."""
    router = APIRouter()

    @router.get("/v2/health/live", response_model=ServerLiveResponse)
    async def live() -> dict:
        return {"live": True}

    @router.get("/v2/health/ready", response_model=ServerReadyResponse, responses=_ERRORS)
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 400)

    return router


def metadata_router(state: ServerState) -> APIRouter:
    """Server and model metadata, model readiness and config, Prometheus metrics."""
    router = APIRouter()
    repository = state.repository

    @router.get("/v2", response_model=ServerMetadataResponse)
    async def server_metadata() -> dict:
        extensions = ["binary_tensor_data", *TRITON_EXTENSIONS]
        return {"name": "bnexport", "version": __version__, "extensions": extensions}

    @router.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=_ERRORS)
    @router.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadataResponse,
        responses=_ERRORS,
    )
    async def model_metadata(name: str, version: str | None = None) -> Any:
        model = repository.get(name, version)
        return model.metadata(repository.versions(name) if version is None else [model.version])

    @router.get("/v2/models/{name}/ready", response_model=ModelReadyResponse, responses=_ERRORS)
    @router.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReadyResponse,
        responses=_ERRORS,
    )
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        model = repository.get(name, version)
        ok = state.ready
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 400)

    @router.get("/v2/models/{name}/config", responses=_ERRORS)
    @router.get("/v2/models/{name}/versions/{version}/config", responses=_ERRORS)
    async def model_config(name: str, version: str | None = None) -> dict:
        return _config_json(repository.get(name, version))

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return router


def _config_json(model: ServedModel) -> dict:
    """Triton-style model configuration (as JSON) of a served model."""
    from bnexport.serve.protocol.codec import datatype_of

    batched = model.batchable and model.max_batch > 1

    def tensors(infos: list) -> list[dict]:
        out = []
        for t in infos:
            dims = [-1 if d is None else int(d) for d in t.shape]
            dt = datatype_of(t.dtype)
            out.append(
                {
                    "name": t.name,
                    "data_type": "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}",
                    "dims": dims[1:] if batched else dims,
                }
            )
        return out

    cfg: dict = {
        "name": model.name,
        "platform": model.platform,
        "max_batch_size": model.max_batch if batched else 0,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
    }
    if batched:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": int(model.batch_timeout_s * 1e6)}
    return cfg
