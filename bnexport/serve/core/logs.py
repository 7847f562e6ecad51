"""Structured logs of the server: one JSON object per line.

Each record carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` (the
message) and the fields passed as ``extra={"fields": {...}}``. Access records use
``event="request"`` with ``method``, ``path``, ``status``, ``ms`` and ``client`` (and
``error`` when the request failed before an endpoint answered); every transport writes
them through :func:`log_access`, so HTTP, the h11 guard and gRPC log alike.
Nothing is configured at import: :func:`configure_logging` is called by
``bnexport serve`` / :func:`bnexport.serve.serve_model`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from typing import Any, TextIO

LOGGER_NAME = "bnexport.serve"


class JsonLineFormatter(logging.Formatter):
    """Format a record as one JSON object (no newline inside)."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        entry: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send the server's and uvicorn's logs to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    # "bnexport.int8": Session's load-time warning on int8 kernels that can saturate here
    for name in (LOGGER_NAME, "uvicorn", "uvicorn.error", "bnexport.int8"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def get_logger() -> logging.Logger:
    """The server's logger."""
    return logging.getLogger(LOGGER_NAME)


def log_access(
    logger: logging.Logger,
    *,
    method: str | None,
    path: str | None,
    status: int | str,
    start: float | None,
    client: str | None,
    error: str | None = None,
) -> None:
    """Write one access record (``event="request"``) at ``INFO``, if that level is on.

    Args:
        logger: the server's logger (:func:`get_logger`).
        method: HTTP method, ``"grpc"`` for an RPC, ``None`` when no request line was read.
        path: request path (``/inference.GRPCInferenceService/<RPC>`` for gRPC).
        status: HTTP status, or the gRPC status code's name.
        start: ``time.perf_counter()`` at arrival; ``None``: no duration (``ms`` left out).
        client: ``host:port`` of the peer.
        error: why the request ended before an endpoint answered.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {"method": method, "path": path, "status": status}
    if start is not None:
        fields["ms"] = round((time.perf_counter() - start) * 1000, 3)
    fields["client"] = client
    if error is not None:
        fields["error"] = error
    logger.info("request", extra={"fields": fields})


def peer(client: tuple[str, int] | list | None) -> str | None:
    """``host:port`` of an ASGI ``scope["client"]`` (``None`` when unknown)."""
    return f"{client[0]}:{client[1]}" if client else None
