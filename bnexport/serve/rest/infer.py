"""The inference endpoint: ``POST /v2/models/{name}[/versions/{version}]/infer``.

The HTTP half of one request; the data plane (:mod:`bnexport.serve.core.dataplane`)
does the rest, as it does for gRPC::

    body   = read_body(request)                 # Content-Encoding undone, size-checked
    req    = codec.decode_request(body, hlen)   # JSON (+ binary tail) -> NumPy arrays
    ...      dataplane.infer(...)               # check, batch, run (shared with gRPC)
    answer = codec.encode_response(...)         # NumPy -> JSON (+ binary tail)

Decoding of anything but small bodies runs in a worker thread, so the event loop (and
with it ``/v2/health/*``) never waits on one request's bytes (JSON bodies of several
MiB are parsed in a helper process, see :mod:`bnexport.serve.rest.decode_process`), and
large responses leave in slices. Errors end the request with a KServe error body; a
client that goes away while its body is being read ends it with status 499 (logged
once, counted, no traceback).
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from bnexport.serve.core.dataplane import OFFLOAD_BYTES, DataPlane
from bnexport.serve.protocol import codec
from bnexport.serve.protocol.binary import HEADER_LENGTH
from bnexport.serve.protocol.errors import (
    BadRequestError,
    ClientGoneError,
    PayloadTooLargeError,
    ServeError,
)
from bnexport.serve.protocol.types import InferenceRequest, InferenceResponse
from bnexport.serve.rest.responses import ERRORS, serve_error_response

#: responses above this many bytes are sent in slices of this size
SEND_SLICE = 1 << 20


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


async def decode_body(decoder: Any, request: Request, max_body_bytes: int) -> codec.DecodedRequest:
    """Read and decode an infer body without blocking the event loop on a large one.

    Small bodies (up to :data:`OFFLOAD_BYTES`) decode on the loop; larger ones in a
    worker thread; JSON bodies of ``decoder.min_bytes`` or more in the helper
    process (:mod:`bnexport.serve.rest.decode_process`), since a JSON parse holds the GIL.
    JSON (the whole body, or the header part of a binary one) above
    ``decoder.max_bytes`` is refused first with 413.
    """
    body = await read_body(request, max_body_bytes)
    header = request.headers.get(HEADER_LENGTH)
    # a JSON parse costs ~20x its size: it has a limit of its own (413 above it)
    json_len = len(body) if header is None or not header.isdigit() else int(header)
    decoder.check_size(min(json_len, len(body)))
    if len(body) <= OFFLOAD_BYTES:
        return codec.decode_request(body, header)
    if header is None and len(body) >= decoder.min_bytes:
        return await decoder.decode(body, header)
    return await asyncio.to_thread(codec.decode_request, body, header)


def _encode(model: Any, req: codec.DecodedRequest, results: dict) -> tuple[bytes, int | None]:
    """The response body (JSON, or JSON + binary tail) and its JSON header length."""
    return codec.encode_response(
        model.name, model.version, req.id, results, req.outputs, req.binary_output
    )


def add_infer_routes(router: Any, dataplane: DataPlane, max_body_bytes: int) -> Any:
    """Add the two inference routes to ``router`` (an ``APIRouter`` or the ``FastAPI`` app).

    The app registers them on itself, not through ``include_router``: FastAPI matches an
    included router's routes in a second pass, after the app's own, on every request.
    """
    responses = {200: {"model": InferenceResponse}, **ERRORS}
    schema = {"content": {"application/json": {"schema": InferenceRequest.model_json_schema()}}}
    decoder = dataplane.state.decoder

    @router.post(
        "/v2/models/{name}/infer",
        responses=responses,
        openapi_extra={"requestBody": schema},
    )
    @router.post("/v2/models/{name}/versions/{version}/infer", responses=responses)
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        try:
            payload, header_len = await dataplane.infer(
                name,
                version,
                lambda: decode_body(decoder, request, max_body_bytes),
                _encode,
                deadline_s=dataplane.request_timeout_s,
            )
        except ServeError as exc:
            return serve_error_response(exc)
        if header_len is None:
            return _response(payload, "application/json", {})
        return _response(payload, "application/octet-stream", {HEADER_LENGTH: str(header_len)})

    return router


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
