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

:func:`create_app` only assembles: the shared
:class:`~bnexport.serve.core.state.ServerState`, the data plane over it
(:mod:`bnexport.serve.core.dataplane`, which answers every endpoint here and over
gRPC), the error handlers, one router per group of endpoints (health and metadata
here, inference in :mod:`bnexport.serve.rest.infer`), and the ASGI guard in front
(:mod:`bnexport.serve.rest.middleware`). Its defaults are
:class:`~bnexport.serve.settings.ServeSettings`'s.
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
from bnexport.serve.core.dataplane import DataPlane
from bnexport.serve.core.logs import get_logger
from bnexport.serve.core.metrics import ServerMetrics
from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.core.state import ServerState
from bnexport.serve.protocol.errors import ServeError
from bnexport.serve.protocol.types import (
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
)
from bnexport.serve.rest.decode_process import DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES, DecodeProcess
from bnexport.serve.rest.infer import add_infer_routes, read_body
from bnexport.serve.rest.middleware import GuardMiddleware
from bnexport.serve.rest.responses import ERRORS, error_response, serve_error_response
from bnexport.serve.rest.routes_triton import triton_router
from bnexport.serve.settings import INFLIGHT_BODIES, ServeSettings
from bnexport.serve.triton.config import config_json

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "error_response", "read_body"]

_DEFAULTS = ServeSettings()
DEFAULT_MAX_BODY_BYTES = _DEFAULTS.max_body_bytes
#: extensions only the HTTP protocol has (both have the data plane's)
HTTP_EXTENSIONS = ("binary_tensor_data",)


def create_app(
    repository: ModelRepository,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    instances: int = _DEFAULTS.instances,
    batch_policy: str = _DEFAULTS.batch_policy,
    metrics: ServerMetrics | None = None,
    max_inflight_bytes: int | None = None,
    max_inflight_requests: int = _DEFAULTS.max_inflight_requests,
    admission_wait_s: float = _DEFAULTS.admission_wait_s,
    body_timeout_s: float | None = _DEFAULTS.body_timeout_s,
    json_process_min_bytes: int = DEFAULT_MIN_BYTES,
    open_metrics: bool = _DEFAULTS.open_metrics,
    json_max_bytes: int = DEFAULT_MAX_BYTES,
    request_timeout_s: float | None = None,
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
        request_timeout_s: deadline of an infer request from arrival to answer, else 408
            (a model that never returns gives its slot back); ``None``: none. gRPC's
            frontend takes the same value for calls without a deadline.

    Returns:
        The ASGI app (FastAPI wrapped in :class:`GuardMiddleware`); the FastAPI
        instance is ``app.fastapi``, the shared state ``app.state``, the in-flight bound
        ``app.admission`` and the data plane ``app.dataplane``.
    """
    state = ServerState(
        repository,
        metrics or ServerMetrics(),
        instances,
        batch_policy,
        decoder=DecodeProcess(json_process_min_bytes, json_max_bytes),
    )
    admission = Admission(
        max_inflight_bytes or INFLIGHT_BODIES * max_body_bytes,
        max_inflight_requests,
        max_wait_s=admission_wait_s,
    )
    api = FastAPI(
        title="bnexport server",
        version=__version__,
        description="KServe v2 / Open Inference Protocol over HTTP/REST.",
        lifespan=_lifespan(state),
    )
    dataplane = DataPlane(state, admission, request_timeout_s)
    _add_error_handlers(api)
    # -- routers: one line per group of endpoints --------------------------------------------
    add_infer_routes(api, dataplane, max_body_bytes)  # on the app itself: matched first
    api.include_router(health_router(dataplane))
    api.include_router(triton_router(dataplane))  # before metadata: /v2/models/stats
    api.include_router(metadata_router(dataplane))
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
    app.dataplane = dataplane  # type: ignore[attr-defined]
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
    its first call: a long stall of the event loop, which would land on the first client
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
    async def _serve_error(_: Request, exc: ServeError) -> Response:
        return serve_error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(400, f"{where}: {first['msg']}")


def _ready(ok: bool, body: dict) -> JSONResponse:
    """A readiness answer: 200 when ready, 400 when not (the KServe v2 rule)."""
    return JSONResponse(body, status_code=200 if ok else 400)


def health_router(dataplane: DataPlane) -> APIRouter:
    """``/v2/health/live`` and ``/v2/health/ready``: answered on the event loop, no I/O."""
    router = APIRouter()

    @router.get("/v2/health/live", response_model=ServerLiveResponse)
    async def live() -> dict:
        return {"live": dataplane.live()}

    @router.get("/v2/health/ready", response_model=ServerReadyResponse, responses=ERRORS)
    async def ready() -> JSONResponse:
        ok = dataplane.ready()
        return _ready(ok, {"ready": ok})

    return router


def metadata_router(dataplane: DataPlane) -> APIRouter:
    """Server and model metadata, model readiness and config, Prometheus metrics."""
    router = APIRouter()
    metrics = dataplane.state.metrics

    @router.get("/v2", response_model=ServerMetadataResponse)
    async def server_metadata() -> dict:
        return dataplane.server_metadata(HTTP_EXTENSIONS)

    @router.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=ERRORS)
    @router.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadataResponse,
        responses=ERRORS,
    )
    async def model_metadata(name: str, version: str | None = None) -> Any:
        return dataplane.model_metadata(name, version)

    @router.get("/v2/models/{name}/ready", response_model=ModelReadyResponse, responses=ERRORS)
    @router.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReadyResponse,
        responses=ERRORS,
    )
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        ok = dataplane.model_ready(name, version)
        return _ready(ok, {"name": name, "ready": ok})

    @router.get("/v2/models/{name}/config", responses=ERRORS)
    @router.get("/v2/models/{name}/versions/{version}/config", responses=ERRORS)
    async def model_config(name: str, version: str | None = None) -> dict:
        return config_json(dataplane.model_config(name, version))

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return router
