"""Errors the server turns into KServe error bodies (``{"error": "..."}``).

Each carries the HTTP status it maps to; the message names the model, input or
field at fault. They derive from :class:`bnexport.errors.BnexportError` so a
caller embedding the server can catch them like any other bnexport error.
"""

from __future__ import annotations

from bnexport.errors import BnexportError, UsageError


class ServeError(BnexportError):
    """Base of the errors that end one request with a 4xx/5xx status."""

    status_code = 500
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
    """The request body did not arrive within the body timeout (408; the connection closes)."""

    status_code = 408
    headers = {"Connection": "close"}


class ClientGoneError(ServeError):
    """The client closed the connection before its request was read (499, nothing is sent)."""

    status_code = 499


class UnavailableError(ServeError):
    """The server is shutting down and takes no new inference work (503)."""

    status_code = 503


class OverloadedError(ServeError):
    """The in-flight bound is reached and the wait for room ran out (503, ``Retry-After``)."""

    status_code = 503

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
