"""The inference endpoint: ``POST /v2/models/{name}[/versions/{version}]/infer``.

One request goes through five steps::

    body   = read_body(request)                 # Content-Encoding undone, size-checked
    req    = codec.decode_request(body, hlen)   # JSON (+ binary tail) -> NumPy arrays
    rows   = model.check_inputs(req.inputs)     # names, dtypes, shapes vs the model
    Y      = await batcher.submit(X, rows)      # merged with concurrent requests
    answer = codec.encode_response(...)         # NumPy -> JSON (+ binary tail)

Decoding and encoding of anything but small bodies run in a worker thread, so
the event loop (and with it ``/v2/health/*``) never waits on one request's
bytes. Errors end the request with a KServe error body; a client that goes away
while its body is being read ends it with status 499 (logged, counted, no
traceback).
"""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

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
from bnexport.serve.protocol import ErrorResponse, InferenceRequest, InferenceResponse
from bnexport.serve.repository import ServedModel

if TYPE_CHECKING:
    from bnexport.serve.app import ServerState

#: JSON bodies / outputs above these sizes are (de)serialized in a worker thread
_OFFLOAD_BYTES = 256 << 10
_OFFLOAD_ELEMENTS = 64 << 10
_ERRORS: dict = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


def error_response(status: int, message: str) -> JSONResponse:
    """A KServe error body with ``status``."""
    return JSONResponse({"error": message}, status_code=status)


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


def infer_router(state: ServerState, max_body_bytes: int) -> APIRouter:
    """Router with the two inference routes of ``state``'s repository."""
    router = APIRouter()
    responses = {200: {"model": InferenceResponse}, **_ERRORS}
    schema = {"content": {"application/json": {"schema": InferenceRequest.model_json_schema()}}}

    @router.post(
        "/v2/models/{name}/infer",
        responses=responses,
        openapi_extra={"requestBody": schema},
    )
    @router.post("/v2/models/{name}/versions/{version}/infer", responses=responses)
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return await handle_infer(state, max_body_bytes, request, name, version)

    return router


async def handle_infer(
    state: ServerState, max_body_bytes: int, request: Request, name: str, version: str | None
) -> Response:
    """Answer one inference request; records its status and latency in the metrics."""
    metrics = state.metrics
    start = time.perf_counter()
    labels = ("unknown", "")
    status = 500
    inflight = None
    expected = None  # the batcher told to expect this request, until it is submitted
    try:
        model = state.repository.get(name, version)
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
