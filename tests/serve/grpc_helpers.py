"""Helpers of the gRPC tests: HTTP and gRPC served together, as ``bnexport serve --grpc-port``.

The server is :class:`bnexport.serve.server.DrainingServer` (what ``serve_model``
runs) with a :class:`~bnexport.serve.grpc.server.GrpcFrontend`, in a daemon
thread, both on free loopback ports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from support.servers import serving_in_thread

from bnexport.serve.grpc.server import GrpcFrontend
from bnexport.serve.server import DrainingServer


@dataclasses.dataclass
class Servers:
    """Addresses of a running server pair and the uvicorn server object."""

    http: str
    grpc: str
    server: DrainingServer
    thread: threading.Thread

    def sigterm(self) -> None:
        """What SIGTERM does to ``bnexport serve`` (from the test thread)."""
        self.server.handle_exit(signal.SIGTERM, None)


@contextlib.contextmanager
def running_servers(
    app: Any,
    *,
    token: str | None = None,
    grace_s: float = 10.0,
    request_timeout_s: float | None = None,
) -> Iterator[Servers]:
    """Serve ``app`` over HTTP and gRPC on 127.0.0.1; yield their addresses.

    ``request_timeout_s``: the gRPC deadline of infer calls that carry none
    (``bnexport serve`` passes ``--body-timeout-s``).
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=grace_s,
    )
    grpc = GrpcFrontend(
        app.state,
        "127.0.0.1",
        0,
        token=token,
        max_message_bytes=app.max_body_bytes if hasattr(app, "max_body_bytes") else 64 << 20,
        admission=getattr(app, "admission", None),
        request_timeout_s=request_timeout_s,
    )
    server = DrainingServer(config, app.state, grpc=grpc)
    with serving_in_thread(server, start_s=20, stop_s=30) as (port, thread):
        yield Servers(f"127.0.0.1:{port}", grpc.address, server, thread)
