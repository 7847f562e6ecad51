"""The gRPC listener next to uvicorn: same event loop, same state, drained on shutdown.

A ``grpc.aio`` server must run on the event loop that owns the batchers (their
queues and futures belong to it), so :class:`GrpcFrontend` is started and
stopped from inside uvicorn's loop by :class:`bnexport.serve.server.DrainingServer`::

    await frontend.start()           # before uvicorn serves: binds host:port
    ...                              # both protocols serve
    frontend.begin_stop(grace)       # on SIGTERM: new RPCs are refused at once,
                                     # those in flight get up to `grace` seconds
    await frontend.stop(grace)       # after uvicorn has drained: wait for the rest

Limits: a message larger than the body limit (``--max-body-mb``) is refused by
grpc itself with RESOURCE_EXHAUSTED; responses are not limited (the client sets
its own receive limit; ``tritonclient.grpc`` allows 2 GiB). grpc parses a whole
message before the handler runs, so the in-flight bound (``--max-inflight-requests``)
would see a burst of large messages only once they all sit in memory; the same
number is therefore also grpc's ``maximum_concurrent_rpcs``: an RPC beyond it (a
stream counts as one, health checks count too) is refused at once with
RESOURCE_EXHAUSTED, before its message is read. Parsed messages waiting for
admission hold at most ``max_inflight_requests x max_message_bytes``. An infer
request whose call has no deadline gets ``request_timeout_s`` (see
:mod:`bnexport.serve.grpc.service`).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from bnexport.serve.core.logs import get_logger
from bnexport.serve.settings import ServeSettings

if TYPE_CHECKING:
    from bnexport.serve.core.state import ServerState

_DEFAULTS = ServeSettings()


class GrpcFrontend:
    """``inference.GRPCInferenceService`` on ``host:port``, serving ``state``.

    Args:
        state: the server's shared state (the HTTP app's ``app.state``).
        host: bind address.
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        token: bearer token (``authorization`` metadata), ``None`` for none.
        max_message_bytes: largest request message.
        admission: the HTTP app's in-flight bound (``app.admission``), shared so that
            both protocols together stay under it; ``None``: no bound.
        max_concurrent_rpcs: RPCs served at once, more get RESOURCE_EXHAUSTED; ``None``:
            the admission's request bound (unbounded without admission).
        request_timeout_s: deadline of an infer request whose call carries none
            (``bnexport serve`` passes ``--body-timeout-s``); ``None``: none.
    """

    def __init__(
        self,
        state: ServerState,
        host: str,
        port: int,
        *,
        token: str | None = None,
        max_message_bytes: int = _DEFAULTS.max_body_bytes,
        admission: Any = None,
        max_concurrent_rpcs: int | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.token = token
        self.max_message_bytes = int(max_message_bytes)
        self.admission = admission
        if max_concurrent_rpcs is None and admission is not None:
            max_concurrent_rpcs = admission.max_requests
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.request_timeout_s = request_timeout_s
        self._server: Any = None
        self._stopping: asyncio.Future | None = None

    @property
    def address(self) -> str:
        """``host:port`` as clients write it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving (on the running loop).

        Raises:
            ListenError: the address cannot be bound (port in use, bad host); a
                :class:`~bnexport.errors.UsageError`.
        """
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        from bnexport.serve.grpc.service import InferenceServicer

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        servicer = InferenceServicer(
            self.state, self.token, self.admission, request_timeout_s=self.request_timeout_s
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        bound = self._bind(server, target)
        self.port = bound
        await server.start()
        self._server = server
        get_logger().info("grpc listening", extra={"fields": {"address": self.address}})

    @staticmethod
    def _bind(server: Any, target: str) -> int:
        """``server.add_insecure_port(target)``; one :class:`ListenError` line on failure.

        gRPC core reports a failed bind on descriptor 2 itself (``E... add_port.cc:83]
        Failed to add port ...``) before Python sees it; that line is caught here and its
        reason (``Address already in use``) goes into the one-line error instead.
        """
        from bnexport.serve.protocol.errors import ListenError
        from bnexport.stderr_capture import captured_fd2, read_captured

        bound, caught = 0, ""
        with captured_fd2() as sink:
            try:
                bound = server.add_insecure_port(target)
            except RuntimeError:
                bound = 0
            caught = read_captured(sink)
        if bound:
            if caught:  # not ours to drop
                sys.stderr.write(caught)
            return bound
        known = ("Address already in use", "Permission denied", "Cannot assign")
        reason = next((r for r in known if r in caught), "address in use or not available")
        hint = {
            "Address already in use": "the port is in use by another process; "
            "choose another --grpc-port",
            "Permission denied": "ports below 1024 need privileges; choose another --grpc-port",
        }.get(reason, "check --host and --grpc-port")
        raise ListenError(f"cannot serve gRPC on {target}: {reason} ({hint})")

    def begin_stop(self, grace_s: float) -> None:
        """Refuse new RPCs now; let those in flight finish within ``grace_s`` (non-blocking)."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(grace_s))

    async def stop(self, grace_s: float) -> None:
        """Stop serving; returns when the RPCs in flight have finished (or ``grace_s`` passed)."""
        self.begin_stop(grace_s)
        if self._stopping is not None:
            await self._stopping
        self._server = None
