"""The inference endpoint: ``POST /v2/models/{name}[/versions/{version}]/infer``.

One request goes through five steps::

    body   = read_body(request)                 # Content-Encoding undone, size-checked
    req    = codec.decode_request(body, hlen)   # JSON (+ binary tail) -> NumPy arrays
    rows   = model.check_inputs(req.inputs)     # names, dtypes, shapes vs the model
    Y      = await batcher.submit(X, rows)      # merged with concurrent requests
    answer = codec.encode_response(...)         # NumPy -> JSON (+ binary tail)

Decoding and encoding of anything but small bodies run in a worker thread, so
the event loop (and with it ``/v2/health/*``) never waits on one request's
bytes (JSON bodies of several MiB are parsed in a helper process, see
:mod:`bnexport.serve.rest.decode_process`), and large responses leave in slices.
Errors end the request with a KServe error body; a client that goes away while
its body is being read ends it with status 499 (logged once, counted, no
traceback).
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from bnexport.serve.core.infer_scope import InferScope
from bnexport.serve.protocol import codec
from bnexport.serve.protocol.binary import HEADER_LENGTH
from bnexport.serve.protocol.errors import (
    BadRequestError,
    ClientGoneError,
    PayloadTooLargeError,
    ServeError,
)
from bnexport.serve.protocol.types import ErrorResponse, InferenceRequest, InferenceResponse

if TYPE_CHECKING:
    from bnexport.serve.rest.app import ServerState

#: bodies / outputs above this many bytes are decoded / encoded in a worker thread
OFFLOAD_BYTES = 256 << 10
#: responses above this many bytes are sent in slices of this size
SEND_SLICE = 1 << 20
_ERRORS: dict = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 500, 503)
}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """A KServe error body with ``status``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def receive_body(request: Request, max_bytes: int) -> bytearray:
    """The raw request body, read into one growing buffer.

    Raises:
        ClientGoneError: the client disconnected before the body was complete.
    """
    # grown chunk by chunk: no zero-filled buffer up front (64 MiB of page faults in one
    # go) and no join of every chunk at the end (a 64 MiB copy), both on the event loop
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
    except ClientDisconnect:
        raise ClientGoneError(f"client disconnected after {len(body)} body bytes") from None
    return body


def decompress(body: bytes | bytearray, encoding: str, limit: int) -> bytes | bytearray:
    """Undo ``Content-Encoding`` (``identity``, ``gzip``, ``deflate``); at most ``limit`` bytes."""
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


async def read_body(request: Request, limit: int) -> bytes | bytearray:
    """The request body, decoded per ``Content-Encoding`` and size-checked."""
    body = await receive_body(request, limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if len(body) > OFFLOAD_BYTES and encoding not in ("", "identity"):
        return await asyncio.to_thread(decompress, body, encoding, limit)
    return decompress(body, encoding, limit)


async def decode_body(
    state: ServerState, request: Request, max_body_bytes: int
) -> codec.DecodedRequest:
    """Read and decode an infer body without blocking the event loop on a large one.

    Small bodies (up to :data:`OFFLOAD_BYTES`) decode on the loop; larger ones in a
    worker thread; JSON bodies of ``state.decoder.min_bytes`` or more in the helper
    process (:mod:`bnexport.serve.rest.decode_process`), since a JSON parse holds the GIL.
    JSON (the whole body, or the header part of a binary one) above
    ``state.decoder.max_bytes`` is refused first with 413.
    """
    body = await read_body(request, max_body_bytes)
    header = request.headers.get(HEADER_LENGTH)
    # JSON costs ~20x its size to parse: it has a limit of its own (413 above it)
    json_len = len(body) if header is None or not header.isdigit() else int(header)
    state.decoder.check_size(min(json_len, len(body)))
    if len(body) <= OFFLOAD_BYTES:
        return codec.decode_request(body, header)
    if header is None and len(body) >= state.decoder.min_bytes:
        return await state.decoder.decode(body, header)
    return await asyncio.to_thread(codec.decode_request, body, header)


def infer_router(state: ServerState, max_body_bytes: int) -> APIRouter:
    """Router with the two inference routes of ``state``'s repository."""
    return add_infer_routes(APIRouter(), state, max_body_bytes)


def add_infer_routes(router: Any, state: ServerState, max_body_bytes: int) -> Any:
    """Add the two inference routes to ``router`` (an ``APIRouter`` or the ``FastAPI`` app).

    The app registers them on itself, not through ``include_router``: FastAPI (0.16x)
    matches an included router in a second pass that costs ~0.1 ms per request.
    """
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
    try:
        with InferScope(state) as scope:
            model = scope.open(name, version)
            req = await decode_body(state, request, max_body_bytes)
            if sum(a.nbytes for a in req.inputs.values()) > OFFLOAD_BYTES:
                rows = await asyncio.to_thread(model.check_inputs, req.inputs)
            else:
                rows = model.check_inputs(req.inputs)
            model.check_outputs(req.outputs)
            results = await scope.run(req.inputs, rows)
            encode = functools.partial(
                codec.encode_response,
                model.name,
                model.version,
                req.id,
                results,
                req.outputs,
                req.binary_output,
            )
            if sum(v.nbytes for v in results.values()) > OFFLOAD_BYTES:
                payload, header_len = await asyncio.to_thread(encode)
            else:
                payload, header_len = encode()
            scope.succeeded()
    except ServeError as exc:
        return error_response(exc.status_code, str(exc), exc.headers or None)
    headers = {} if header_len is None else {HEADER_LENGTH: str(header_len)}
    media = "application/json" if header_len is None else "application/octet-stream"
    return _response(payload, media, headers)


def _response(payload: bytes, media_type: str, headers: dict[str, str]) -> Response:
    """A 200 response; large payloads leave in :data:`SEND_SLICE` slices.

    One ``send`` of tens of MiB would copy the whole payload on the event loop
    (h11 framing, then the transport's buffer); slices copy 1 MiB at a time and
    wait for the socket to drain between them.
    """
    if len(payload) <= SEND_SLICE:
        return Response(payload, media_type=media_type, headers=headers)
    view = memoryview(payload)

    async def slices():
        for i in range(0, len(view), SEND_SLICE):
            yield view[i : i + SEND_SLICE]

    headers = {**headers, "Content-Length": str(len(payload))}
    return StreamingResponse(slices(), media_type=media_type, headers=headers)
