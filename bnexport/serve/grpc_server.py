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
its own receive limit; ``tritonclient.grpc`` allows 2 GiB).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from bnexport.errors import UsageError
from bnexport.serve.logs import get_logger

if TYPE_CHECKING:
    from bnexport.serve.app import ServerState


class GrpcFrontend:
    """``inference.GRPCInferenceService`` on ``host:port``, serving ``state``.

    Args:
        state: the HTTP app's shared state (``app.state``).
        host: bind address.
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        token: bearer token (``authorization`` metadata), ``None`` for none.
        max_message_bytes: largest request message.
        admission: the HTTP app's in-flight bound (``app.admission``), shared so that
            both protocols together stay under it; ``None``: no bound.
    """

    def __init__(
        self,
        state: ServerState,
        host: str,
        port: int,
        *,
        token: str | None = None,
        max_message_bytes: int = 64 << 20,
        admission: Any = None,
    ) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.token = token
        self.max_message_bytes = int(max_message_bytes)
        self.admission = admission
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
            UsageError: the address cannot be bound (port in use, bad host).
        """
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        from bnexport.serve.grpc_service import InferenceServicer

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.state, self.token, self.admission), server
        )
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise UsageError(f"cannot serve gRPC on {target}: {exc}") from None
        if not bound:
            raise UsageError(f"cannot serve gRPC on {target}: address in use or not available")
        self.port = bound
        await server.start()
        self._server = server
        get_logger().info("grpc listening", extra={"fields": {"address": self.address}})

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
