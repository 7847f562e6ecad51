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
    with serving_in_thread(server, start_s=10, stop_s=10) as (port, _thread):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def serving_in_thread(
    server: Any, *, start_s: float, stop_s: float
) -> Iterator[tuple[int, threading.Thread]]:
    """Run a ``uvicorn.Server`` in a daemon thread; yield ``(port, thread)`` once it serves.

    On exit the server is asked to stop and the thread is joined (``stop_s`` at most).

    Raises:
        AssertionError: it did not start within ``start_s``.
        RuntimeError: it stopped before it started serving.
    """
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(
        lambda: server.started or not thread.is_alive(), start_s, message="uvicorn did not start"
    )
    if not server.started:
        raise RuntimeError("uvicorn stopped before it started serving")
    try:
        yield server.servers[0].sockets[0].getsockname()[1], thread
    finally:
        server.should_exit = True
        thread.join(timeout=stop_s)
