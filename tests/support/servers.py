"""Start the server in process (uvicorn in a daemon thread on a free loopback port); free ports."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from bnexport.serve.settings import ServeSettings
from support.waiting import wait_until


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a server started in a subprocess)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    app: Any, *, header_timeout_s: float = ServeSettings().header_timeout_s, **config: Any
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> in a thread; yield ``host:port``.

    The server speaks through :class:`bnexport.serve.rest.http11.GuardedH11Protocol`, as
    ``bnexport serve`` does; ``config`` goes to ``uvicorn.Config``.
    """
    import uvicorn

    from bnexport.serve.rest.http11 import protocol_class

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            http=protocol_class(header_timeout_s),
            **config,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 10, message="uvicorn did not start")
    if not server.started:
        raise RuntimeError("uvicorn stopped before it started serving")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
