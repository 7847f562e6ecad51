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
or wrong input, 401 auth, 404 unknown model/route, 413 body over the limit, 500
the model failed on this request (only this one), 503 shutting down. The
request body may be ``gzip``/``deflate`` encoded (``Content-Encoding``), as
``tritonclient`` sends it with ``request_compression_algorithm``; the decoded
size counts against the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import zlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bnexport import __version__
from bnexport.errors import InputError
from bnexport.serve import codec
from bnexport.serve.batcher import DynamicBatcher
from bnexport.serve.binary import HEADER_LENGTH
from bnexport.serve.errors import (
    BadRequestError,
    ModelRunError,
    PayloadTooLargeError,
    ServeError,
)
from bnexport.serve.logs import get_logger
from bnexport.serve.metrics import ServerMetrics
from bnexport.serve.middleware import GuardMiddleware
from bnexport.serve.protocol import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
)
from bnexport.serve.repository import ModelRepository, ServedModel

DEFAULT_MAX_BODY_BYTES = 64 << 20
#: models whose runs average less than this run on the event loop (no thread handoff)
INLINE_BELOW_S = 200e-6
#: JSON bodies / outputs above these sizes are (de)serialized in a worker thread
_OFFLOAD_BYTES = 256 << 10
_OFFLOAD_ELEMENTS = 64 << 10
_ERRORS: dict = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


def error_response(status: int, message: str) -> JSONResponse:
    """A KServe error body with ``status``."""
    return JSONResponse({"error": message}, status_code=status)


class ServerState:
    """Everything the endpoints share: models, batchers, metrics, readiness."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        instances: int,
        batch_policy: str = "adaptive",
    ):
        self.repository = repository
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
            )
            self._batchers[key] = batcher
        return batcher

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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decoded per ``Content-Encoding`` and size-checked."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServeError(f"unsupported Content-Encoding {encoding!r}", status_code=415)
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequestError(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"decompressed request body is over the limit of {limit} bytes")
    return out


def create_app(
    repository: ModelRepository,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    instances: int = 1,
    batch_policy: str = "adaptive",
    metrics: ServerMetrics | None = None,
) -> Any:
    """Build the ASGI app serving ``repository``.

    Args:
        repository: the loaded models.
        token: bearer token required on every path but ``/v2/health/*``.
        max_body_bytes: largest request body (after decompression), else 413.
        instances: batches of one model that may run at the same time.
        batch_policy: ``"adaptive"`` or ``"window"`` (see :mod:`bnexport.serve.batcher`).
        metrics: metric set (a fresh one by default).

    Returns:
        The ASGI app (FastAPI wrapped in :class:`GuardMiddleware`); the FastAPI
        instance is ``app.fastapi`` and the shared state ``app.state``.
    """
    metrics = metrics or ServerMetrics()
    if batch_policy not in ("adaptive", "window"):
        raise ValueError(f"batch_policy must be 'adaptive' or 'window'. Received: {batch_policy!r}")
    state = ServerState(repository, metrics, instances, batch_policy)
    log = get_logger()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.loop = asyncio.get_running_loop()
        log.info("ready", extra={"fields": {"models": repository.names()}})
        yield
        log.info("draining")
        await state.drain()
        log.info("stopped")

    api = FastAPI(
        title="bnexport server",
        version=__version__,
        description="KServe v2 / Open Inference Protocol over HTTP/REST.",
        lifespan=lifespan,
    )

    @api.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status_code, str(exc))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(400, f"{where}: {first['msg']}")

    # -- health and metadata ------------------------------------------------------------------
    @api.get("/v2/health/live", response_model=ServerLiveResponse)
    async def live() -> dict:
        return {"live": True}

    @api.get("/v2/health/ready", response_model=ServerReadyResponse, responses=_ERRORS)
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 400)

    @api.get("/v2", response_model=ServerMetadataResponse)
    async def server_metadata() -> dict:
        return {"name": "bnexport", "version": __version__, "extensions": ["binary_tensor_data"]}

    @api.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=_ERRORS)
    @api.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadataResponse,
        responses=_ERRORS,
    )
    async def model_metadata(name: str, version: str | None = None) -> Any:
        model = repository.get(name, version)
        return model.metadata(repository.versions(name) if version is None else [model.version])

    @api.get("/v2/models/{name}/ready", response_model=ModelReadyResponse, responses=_ERRORS)
    @api.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReadyResponse,
        responses=_ERRORS,
    )
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        model = repository.get(name, version)
        ok = state.ready
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 400)

    @api.get("/v2/models/{name}/config", responses=_ERRORS)
    @api.get("/v2/models/{name}/versions/{version}/config", responses=_ERRORS)
    async def model_config(name: str, version: str | None = None) -> dict:
        return _config_json(repository.get(name, version))

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    # -- inference ------------------------------------------------------------------------------
    @api.post(
        "/v2/models/{name}/infer",
        responses={200: {"model": InferenceResponse}, **_ERRORS},
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": InferenceRequest.model_json_schema()}}
            }
        },
    )
    @api.post(
        "/v2/models/{name}/versions/{version}/infer",
        responses={200: {"model": InferenceResponse}, **_ERRORS},
    )
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        start = time.perf_counter()
        labels = ("unknown", "")
        status = 500
        inflight = None
        expected = None  # the batcher told to expect this request, until it is submitted
        try:
            model = repository.get(name, version)
            labels = (model.name, model.version)
            inflight = metrics.inflight.labels(*labels)
            inflight.inc()
            batcher = state.batcher(model)
            batcher.expect()
            expected = batcher
            body = await read_body(request, max_body_bytes)
            header = request.headers.get(HEADER_LENGTH)
            big_json = header is None and len(body) > _OFFLOAD_BYTES
            if big_json:  # parsing megabytes of JSON would stall every other request
                req = await asyncio.to_thread(codec.decode_request, body, header)
            else:
                req = codec.decode_request(body, header)
            rows = model.check_inputs(req.inputs)
            model.check_outputs(req.outputs)
            expected = None
            results = await _run(batcher, model, req.inputs, rows)
            encode = functools.partial(
                codec.encode_response,
                model.name,
                model.version,
                req.id,
                results,
                req.outputs,
                req.binary_output,
            )
            json_elements = sum(v.size for v in results.values())
            if json_elements > _OFFLOAD_ELEMENTS and not req.binary_output:
                payload, header_len = await asyncio.to_thread(encode)
            else:
                payload, header_len = encode()
            status = 200
            if header_len is None:
                return Response(payload, media_type="application/json")
            return Response(
                payload,
                media_type="application/octet-stream",
                headers={HEADER_LENGTH: str(header_len)},
            )
        except ServeError as exc:
            status = exc.status_code
            return error_response(status, str(exc))
        except BaseException:
            status = 499  # client went away (cancelled) or an unexpected error
            raise
        finally:
            if expected is not None:
                expected.unexpect()
            if inflight is not None:
                inflight.dec()
            metrics.requests.labels(*labels, str(status)).inc()
            if labels[0] != "unknown":
                metrics.latency.labels(*labels).observe(time.perf_counter() - start)

    app = GuardMiddleware(api, token=token, max_body_bytes=max_body_bytes, logger=log)
    app.fastapi = api  # type: ignore[attr-defined]
    app.state = state  # type: ignore[attr-defined]
    return app


async def _run(batcher: DynamicBatcher, model: ServedModel, inputs: dict, rows: int | None) -> dict:
    """Run one (expected) request through the model's batcher, mapping errors to statuses."""
    try:
        return await batcher.submit(inputs, rows, expected=True)
    except ServeError:
        raise
    except InputError as exc:
        raise BadRequestError(f"model '{model.name}': {exc}") from None
    except Exception as exc:
        get_logger().error(
            "model run failed",
            exc_info=exc,
            extra={"fields": {"model": model.name, "version": model.version}},
        )
        raise ModelRunError(
            f"model '{model.name}' version {model.version} failed on this request: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _config_json(model: ServedModel) -> dict:
    """Triton-style model configuration (as JSON) of a served model."""
    from bnexport.serve.codec import datatype_of

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
