"""Catch what native code writes to file descriptor 2 inside a block.

Libraries written in C++ (TensorFlow while its shared libraries load, gRPC core when a
port cannot be bound) write to descriptor 2 directly; ``sys.stderr`` redirection does
not see it. :func:`captured_fd2` points the descriptor at a temporary file for the
block, so the caller can drop the lines, replay them, or quote them in one message.
Standard library only: used by the command line and by the server's startup.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def captured_fd2() -> Iterator[IO[bytes]]:
    """Point file descriptor 2 at a temporary file inside the block; yield that file.

    ``sys.stderr`` is flushed before and after, so nothing written earlier is lost or
    reordered. Read what was caught with :func:`read_captured`. Other threads writing
    to stderr meanwhile are caught too: keep the block short.
    """
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def read_captured(sink: IO[bytes]) -> str:
    """Everything written to ``sink`` so far, decoded (undecodable bytes replaced)."""
    sink.flush()
    sink.seek(0)
    return sink.read().decode(errors="replace")
