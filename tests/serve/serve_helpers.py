"""Helpers of the server tests: run an app in a uvicorn thread, read Prometheus samples."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from bnexport.serve.app import create_app
from bnexport.serve.repository import ModelRepository


@contextlib.contextmanager
def running_server(app, *, header_timeout_s: float = 10.0, **config) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> in a thread; yield ``host:port``.

    The server speaks through :class:`bnexport.serve.http11.GuardedH11Protocol`, as
    ``bnexport serve`` does; ``config`` goes to ``uvicorn.Config``.
    """
    import uvicorn

    from bnexport.serve.http11 import protocol_class

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
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_app(path, *, max_batch=32, batch_timeout_ms=10.0, **kwargs):
    repo = ModelRepository.from_path(path, max_batch=max_batch, batch_timeout_ms=batch_timeout_ms)
    return create_app(repo, **kwargs)


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text format (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
