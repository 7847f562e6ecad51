"""ASGI middleware in front of the app: framing checks, auth, admission, body limits, access log.

Written as plain ASGI (no ``BaseHTTPMiddleware``) so it adds microseconds, not
a task per request. In order, for every HTTP request:

1. Framing: a ``Content-Length`` that is not a non-negative integer, or a request
   with both ``Content-Length`` and ``Transfer-Encoding`` (request smuggling
   territory, RFC 9112 §6.3), is answered 400 at once and the connection closes.
2. Auth: when a token is set, every path except ``/v2/health/*`` needs
   ``Authorization: Bearer <token>``, checked by :mod:`bnexport.serve.core.auth` (as
   gRPC's metadata is); else 401 with a KServe error body and ``WWW-Authenticate:
   Bearer``. Health stays open for Kubernetes probes.
   With ``open_metrics``, ``GET /metrics`` (that exact path) stays open too: a
   Prometheus that scrapes pods by annotation (KServe's ``prometheus.kserve.io/*``)
   sends no credentials, and the page holds counters and latencies, no tensors.
3. Body limit: a ``Content-Length`` above the limit is answered 413 before the
   body is read; a body without one (chunked) is counted while it streams, and
   :class:`~bnexport.serve.protocol.errors.PayloadTooLargeError` is raised from ``receive``.
4. Admission: a request with a body waits for room under the in-flight bound
   (:mod:`bnexport.serve.core.admission`); no room in time: 503 + ``Retry-After``.
5. Body timeout: the whole body must arrive within ``body_timeout_s`` of the
   first read, else :class:`~bnexport.serve.protocol.errors.RequestTimeoutError` (408,
   the connection closes). uvicorn has header and keep-alive timeouts but none
   for the body: a client sending one byte a minute would hold its slot forever.
6. Access log: one JSON line per request (:func:`bnexport.serve.core.logs.log_access`). A
   client that disconnects before its request is read is logged once with
   status 499, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect

from bnexport.serve.core.admission import Admission
from bnexport.serve.core.auth import BearerToken
from bnexport.serve.core.logs import log_access, peer
from bnexport.serve.protocol.errors import (
    PayloadTooLargeError,
    RequestTimeoutError,
    ServeError,
    UnauthorizedError,
    error_body,
)

Scope = dict[str, Any]
_CLOSE = (b"connection", b"close")


async def send_error(send: Any, status: int, message: str, headers: list | None = None) -> None:
    """Send a complete KServe error response ``{"error": message}``."""
    body = error_body(message)
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
    """Framing checks, auth, admission, body limits and access log around an ASGI app.

    Args:
        app: the wrapped ASGI app.
        token: bearer token, or ``None`` for no auth.
        max_body_bytes: largest accepted request body.
        logger: access logger (``INFO`` records).
        admission: in-flight bound for requests with a body (``None``: unbounded).
        body_timeout_s: time allowed to receive a whole request body (``None``: no limit).
        open_metrics: serve ``GET /metrics`` without the token (for annotation-based
            Prometheus scraping, which cannot send one); every other path still needs it.
    """

    def __init__(
        self,
        app: Any,
        *,
        token: str | None,
        max_body_bytes: int,
        logger: logging.Logger,
        admission: Admission | None = None,
        body_timeout_s: float | None = None,
        open_metrics: bool = False,
    ):
        self.app = app
        self.open_metrics = bool(open_metrics)
        self._token = BearerToken(token)
        self.max_body_bytes = int(max_body_bytes)
        self.admission = admission
        self.body_timeout_s = body_timeout_s
        self._logger = logger

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:  # noqa: D102
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        info: dict[str, Any] = {"status": 0}

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_tracked, info)
        except ClientDisconnect:  # an endpoint read a body the client gave up sending
            info["status"] = 499
            info["error"] = "client disconnected before the request body was read"
        finally:
            if self._logger.isEnabledFor(logging.INFO):  # skip building the record
                log_access(
                    self._logger,
                    method=scope.get("method"),
                    path=scope.get("path"),
                    status=info["status"],
                    start=start,
                    client=peer(scope.get("client")),
                    error=info.get("error"),
                )

    async def _guarded(self, scope: Scope, receive: Any, send: Any, info: dict) -> None:
        headers = scope.get("headers") or []
        lengths = [v for k, v in headers if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if lengths and chunked:
            await send_error(
                send, 400, "request has both Content-Length and Transfer-Encoding", [_CLOSE]
            )
            return
        n = None
        if lengths:
            n = _content_length(lengths)
            if n is None:
                await send_error(
                    send,
                    400,
                    "Content-Length must be one non-negative integer. Received: "
                    + ", ".join(repr(v.decode("latin-1")) for v in lengths),
                    [_CLOSE],
                )
                return
        if self._token.required and not self._open_path(scope):
            given = next((v for k, v in headers if k == b"authorization"), None)
            try:
                self._token.check(given, "Authorization: Bearer <token>")
            except UnauthorizedError as exc:
                await send_error(send, 401, str(exc), [(b"www-authenticate", b"Bearer")])
                return
        if n is not None and n > self.max_body_bytes:
            await send_error(send, 413, self._too_large(n), [_CLOSE])
            return
        if not chunked and not n:  # no body: health, metadata, metrics, ...
            await self.app(scope, receive, send)
            return
        encoded = any(
            k == b"content-encoding" and v.strip().lower() not in (b"", b"identity")
            for k, v in headers
        )
        # what the body may cost once read; unknown up front when chunked or compressed
        cost = self.max_body_bytes if (chunked or encoded or n is None) else n
        body_receive = self._body_receive(receive, info)
        if self.admission is None:
            await self.app(scope, body_receive, send)
            return
        try:
            await self.admission.acquire(cost)
        except ServeError as exc:  # OverloadedError: 503 + Retry-After
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await send_error(send, exc.status_code, str(exc), [*extra, _CLOSE])
            return
        try:
            await self.app(scope, body_receive, send)
        finally:
            self.admission.release(cost)

    def _open_path(self, scope: Scope) -> bool:
        """Paths served without the token: health (probes) and, if asked, ``GET /metrics``."""
        path = scope["path"]
        if path.startswith("/v2/health/"):
            return True
        return self.open_metrics and path == "/metrics" and scope.get("method") in ("GET", "HEAD")

    def _body_receive(self, receive: Any, info: dict) -> Any:
        """``receive`` that counts body bytes against the limit and enforces the body timeout."""
        seen = 0
        deadline: float | None = None
        timeout = self.body_timeout_s
        loop = asyncio.get_running_loop()

        def timed_out() -> RequestTimeoutError:
            return RequestTimeoutError(
                f"request body not received within {timeout:g} s "
                f"({seen} bytes arrived; bnexport serve --body-timeout-s)"
            )

        async def body_receive() -> dict:
            nonlocal seen, deadline
            if timeout is None:
                message = await receive()
            else:
                # one timer that cancels this task, not asyncio.wait_for (a task per message)
                if deadline is None:
                    deadline = loop.time() + timeout
                if loop.time() >= deadline:
                    raise timed_out()
                task = asyncio.current_task()
                fired = False

                def fire() -> None:
                    nonlocal fired
                    fired = True
                    task.cancel()

                timer = loop.call_at(deadline, fire)
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if not fired:
                        raise
                    uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
                    if uncancel is not None:
                        uncancel()
                    raise timed_out() from None
                finally:
                    timer.cancel()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise PayloadTooLargeError(self._too_large(seen, at_least=True))
            elif message["type"] == "http.disconnect":
                info["error"] = f"client disconnected after {seen} body bytes"
            return message

        return body_receive

    def _too_large(self, n: int, at_least: bool = False) -> str:
        more = "more than " if at_least else ""
        return (
            f"request body of {more}{n} bytes is over the limit of {self.max_body_bytes} bytes "
            "(bnexport serve --max-body-mb)"
        )


def _content_length(values: list[bytes]) -> int | None:
    """The one Content-Length of a request, or ``None`` when malformed or contradictory."""
    if len(set(values)) != 1:
        return None
    raw = values[0].strip()
    if not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)
