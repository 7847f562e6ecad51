"""uvicorn's h11 protocol with a request-header timeout and JSON error bodies.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``), but its
timer stops at the first byte of the next request: a client that sends its
request line and headers one byte at a time holds the connection forever (the
"slowloris" attack). :class:`GuardedH11Protocol` gives every request
``header_timeout_s`` from the moment the connection is ready for it (opened, or
the previous response sent) until its head is complete; then it answers 408
and closes. The body has its own timeout (:mod:`bnexport.serve.rest.middleware`).

Requests h11 cannot parse (a garbage request line, a malformed ``Content-Length``,
oversized headers) get uvicorn's plain-text 400; here they get a KServe error
body ``{"error": "invalid HTTP request: <what h11 found>"}`` and one access-log
line with status 400.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bnexport.serve.core.logs import get_logger, log_access, peer
from bnexport.serve.protocol.errors import error_body
from bnexport.serve.settings import ServeSettings

DEFAULT_HEADER_TIMEOUT_S = ServeSettings().header_timeout_s


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying a KServe error body; the connection closes."""
    body = error_body(message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """:class:`uvicorn.protocols.http.h11_impl.H11Protocol` with a header timeout, JSON 400s.

    Build it with :func:`protocol_class`, which binds ``header_timeout_s``.
    """

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False
        self._h11_error = ""
        next_event = self.conn.next_event

        def recording_next_event() -> Any:  # keeps what h11 found wrong for the 400 body
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._h11_error = str(exc)
                raise

        self.conn.next_event = recording_next_event  # type: ignore[method-assign]

    # -- header timeout -----------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._partial = False  # no byte of the next request yet
        if self.header_timeout_s:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served (its head arrived in time)
        if not self._partial:  # idle: close quietly, as uvicorn's keep-alive timeout does
            self.transport.close()
            return
        self.transport.write(
            _raw_response(
                408,
                "Request Timeout",
                f"request headers not received within {self.header_timeout_s:g} s",
            )
        )
        self.transport.close()
        self._log(408, "request headers not received in time")

    def connection_made(self, transport: Any) -> None:  # noqa: D102
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        self._partial = True
        super().data_received(data)

    def handle_events(self) -> None:  # noqa: D102
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head arrived
            self._disarm()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    # -- JSON 400 -----------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:  # noqa: D102 - uvicorn's hook
        self._disarm()
        detail = self._h11_error or msg
        self.transport.write(_raw_response(400, "Bad Request", f"invalid HTTP request: {detail}"))
        self.transport.close()
        self._log(400, detail)

    def _log(self, status: int, error: str) -> None:
        log_access(
            get_logger(),
            method=None,
            path=None,
            status=status,
            start=None,
            client=peer(self.client),
            error=error,
        )


def protocol_class(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with ``header_timeout_s`` (for ``uvicorn.Config``)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": float(header_timeout_s)},
    )
