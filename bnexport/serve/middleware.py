"""ASGI middleware in front of the app: bearer-token auth, body-size limit, access log.

Written as plain ASGI (no ``BaseHTTPMiddleware``) so it adds microseconds, not
a task per request.

- Auth: when a token is set, every path except ``/v2/health/*`` needs
  ``Authorization: Bearer <token>`` (compared in constant time); else 401 with a
  KServe error body and ``WWW-Authenticate: Bearer``. Health stays open for
  Kubernetes probes.
- Body limit: a ``Content-Length`` above the limit is answered 413 before the
  body is read; a body without one (chunked) is counted while it streams, and
  :class:`~bnexport.serve.errors.PayloadTooLargeError` is raised from ``receive``
  (the app turns it into 413).
- Access log: one JSON line per request (see :mod:`bnexport.serve.logs`).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from bnexport.serve.errors import PayloadTooLargeError

Scope = dict[str, Any]


async def send_error(send: Any, status: int, message: str, headers: list | None = None) -> None:
    """Send a complete KServe error response ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Auth, body-size limit and access log around an ASGI app.

    Args:
        app: the wrapped ASGI app.
        token: bearer token, or ``None`` for no auth.
        max_body_bytes: largest accepted request body.
        logger: access logger (``INFO`` records).
    """

    def __init__(self, app: Any, *, token: str | None, max_body_bytes: int, logger: logging.Logger):
        self.app = app
        self._token = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = int(max_body_bytes)
        self._logger = logger

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:  # noqa: D102
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_tracked)
        finally:
            if self._logger.isEnabledFor(logging.INFO):
                client = scope.get("client")
                self._logger.info(
                    "request",
                    extra={
                        "fields": {
                            "method": scope.get("method"),
                            "path": scope.get("path"),
                            "status": status[0],
                            "ms": round((time.perf_counter() - start) * 1000, 3),
                            "client": f"{client[0]}:{client[1]}" if client else None,
                        }
                    },
                )

    async def _guarded(self, scope: Scope, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        if self._token is not None and not scope["path"].startswith("/v2/health/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._token):
                await send_error(
                    send,
                    401,
                    "missing or invalid bearer token (Authorization: Bearer <token>)",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await send_error(send, 400, "Content-Length is not an integer")
                return
            if n > self.max_body_bytes:
                await send_error(send, 413, self._too_large(n))
                return
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise PayloadTooLargeError(self._too_large(seen, at_least=True))
            return message

        await self.app(scope, counted_receive, send)

    def _too_large(self, n: int, at_least: bool = False) -> str:
        more = "more than " if at_least else ""
        return (
            f"request body of {more}{n} bytes is over the limit of {self.max_body_bytes} bytes "
            "(bnexport serve --max-body-mb)"
        )
