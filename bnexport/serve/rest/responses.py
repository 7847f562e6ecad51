"""The HTTP form of an error: the KServe error body and its place in the OpenAPI page.

Every HTTP error leaves as ``{"error": "..."}`` with the status of its
:class:`~bnexport.serve.protocol.errors.ServeError` (the body is built by
:func:`bnexport.serve.protocol.errors.error_body`, which the ASGI guard and the h11
protocol use too); :data:`ERRORS` is the one ``responses=`` table every router documents.
"""

from __future__ import annotations

from fastapi.responses import Response

from bnexport.serve.protocol.errors import ServeError, error_body
from bnexport.serve.protocol.types import ErrorResponse

#: OpenAPI ``responses`` of every route: the statuses an endpoint may answer with an error
ERRORS: dict = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 409, 413, 415, 500, 503)
}


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    """A KServe error body ``{"error": message}`` with ``status``."""
    return Response(error_body(message), status, headers, media_type="application/json")


def serve_error_response(exc: ServeError) -> Response:
    """The HTTP answer to ``exc``: its status, message and headers (``Retry-After`` ...)."""
    return error_response(exc.status_code, str(exc), exc.headers or None)
