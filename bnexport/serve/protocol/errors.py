"""Errors the server turns into KServe error bodies (``{"error": "..."}``) and gRPC statuses.

Each carries the HTTP status it maps to; the message names the model, input or
field at fault. They derive from :class:`bnexport.errors.BnexportError` so a
caller embedding the server can catch them like any other bnexport error.

Both transports answer an error from this module alone: HTTP with
:func:`error_body` and ``status_code``, gRPC with :func:`grpc_code_name` (the
name of a ``grpc.StatusCode``; this module does not import grpc). One table,
:data:`STATUS_TABLE`, holds both mappings side by side, as Triton maps them::

    400 malformed / wrong input             INVALID_ARGUMENT
    401 missing or wrong token              UNAUTHENTICATED
    403 forbidden                           PERMISSION_DENIED
    404 unknown model or version            NOT_FOUND
    408 request too slow (body or answer)   DEADLINE_EXCEEDED
    409 model control not enabled           FAILED_PRECONDITION
    413 body / message over the limit       RESOURCE_EXHAUSTED
    415 unknown Content-Encoding            INVALID_ARGUMENT
    429 too many requests                   RESOURCE_EXHAUSTED
    499 client gone                         CANCELLED
    500 the model failed on the request     INTERNAL
    503 shutting down                       UNAVAILABLE
    503 in-flight bound reached             RESOURCE_EXHAUSTED (:class:`OverloadedError`)

A class whose gRPC code differs from its status's row says so in ``grpc_code``.
"""

from __future__ import annotations

import json

from bnexport.errors import BnexportError, UsageError

#: HTTP status -> name of the ``grpc.StatusCode`` the same error ends an RPC with
STATUS_TABLE: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def error_body(message: str) -> bytes:
    """The KServe error body ``{"error": message}`` as JSON bytes (every HTTP error path)."""
    return json.dumps({"error": message}).encode()


def grpc_code_name(exc: BaseException) -> str:
    """Name of the ``grpc.StatusCode`` that ends an RPC failing with ``exc``.

    A :class:`ServeError` maps through its ``grpc_code`` (when the class sets one) or
    :data:`STATUS_TABLE`; anything else is ``INTERNAL``, and an unknown status ``UNKNOWN``.
    """
    if not isinstance(exc, ServeError):
        return "INTERNAL"
    return exc.grpc_code or STATUS_TABLE.get(exc.status_code, "UNKNOWN")


class ServeError(BnexportError):
    """Base of the errors that end one request with a 4xx/5xx status."""

    status_code = 500
    #: the gRPC status code's name when it is not :data:`STATUS_TABLE`'s for ``status_code``
    grpc_code: str | None = None
    #: extra response headers (``Retry-After``, ``Connection: close``)
    headers: dict[str, str] = {}

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class BadRequestError(ServeError, ValueError):
    """Malformed body, unknown datatype, wrong input name/shape/dtype (400)."""

    status_code = 400


class ModelNotFoundError(ServeError, LookupError):
    """No model (or no such version of it) in the repository (404)."""

    status_code = 404


class UnauthorizedError(ServeError):
    """Missing or wrong bearer token (401)."""

    status_code = 401


class PayloadTooLargeError(ServeError):
    """Request body over the configured limit (413; the connection closes, the rest is unread)."""

    status_code = 413
    headers = {"Connection": "close"}


class RequestTimeoutError(ServeError):
    """The request did not arrive, or was not answered, in time (408; the connection closes)."""

    status_code = 408
    headers = {"Connection": "close"}


class ClientGoneError(ServeError):
    """The client closed the connection before its request was read (499, nothing is sent)."""

    status_code = 499


class UnavailableError(ServeError):
    """The server is shutting down and takes no new inference work (503)."""

    status_code = 503


class OverloadedError(ServeError):
    """The in-flight bound is reached and the wait for room ran out (503, ``Retry-After``).

    Over gRPC it is RESOURCE_EXHAUSTED, as grpc answers a call over
    ``maximum_concurrent_rpcs``; UNAVAILABLE would tell the client the server is going away.
    """

    status_code = 503
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(int(retry_after_s))}


class ModelRunError(ServeError, RuntimeError):
    """The model raised while running this request (500)."""

    status_code = 500


class ListenError(UsageError, OSError):
    """The server cannot listen on the address it was given (names host and port).

    A :class:`~bnexport.errors.UsageError`: ``--host``/``--port``/``--grpc-port`` cannot
    be used as given (exit 2, like any other unusable argument).
    """
