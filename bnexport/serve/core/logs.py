"""Structured logs of the server: one JSON object per line.

Each record carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` (the
message) and the fields passed as ``extra={"fields": {...}}``. Access records use
``event="request"`` with ``method``, ``path``, ``status``, ``ms`` and ``client``.
Nothing is configured at import: :func:`configure_logging` is called by
``bnexport serve`` / :func:`bnexport.serve.serve_model`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
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
