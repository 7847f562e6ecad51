"""Decode large JSON request bodies in a helper process.

Parsing JSON is one C call that holds the GIL from the first byte to the last
(pydantic-core, like ``json.loads``), so a large body would stop the event loop, and
every ``/v2/health/*`` probe with it, for the whole parse, even from a worker thread.
Bodies of ``min_bytes`` or more are therefore parsed by a helper process,
``python -m bnexport.serve.rest.decode_process``, which answers with the decoded
request (NumPy arrays). The helper is a plain subprocess, not a ``multiprocessing``
pool: a ``spawn`` pool re-imports the parent's ``__main__`` script, which in a user's
unguarded script would start a second server.

Wire format on the helper's stdin / stdout (little-endian)::

    request:  u64 body_len | i32 header_len (-1: no header) | header utf-8 | body
    answer:   u64 n | pickle (protocol 5) of ("ok", DecodedRequest) or ("error", exception)
              | u64 k | k x (u64 size | raw bytes of one out-of-band buffer)

Moving the body there and the arrays back is a copy each way, done by the pipe
with the GIL released: the arrays travel as pickle-5 out-of-band buffers, read
straight into the memory the server's arrays then use. The parse's memory leaves
the server too: a JSON body's Python objects take many times its size while it is
parsed, and they now live, briefly, in the helper (``benchmarks/serve_stall_bench.py``
measures the server's and the helper's peak RSS). One body is parsed at a time. If
the helper dies (killed for memory, say) the request gets 503 and the next large body
starts a new helper.

Memory bound: since a JSON parse peaks near 20x the body, JSON bodies have their own
size limit, ``max_bytes`` (:data:`DEFAULT_MAX_BYTES`, the default body limit): a larger
JSON text is answered 413 before it is handed to the helper or a thread
(:meth:`DecodeProcess.check_size`), whatever ``--max-body-mb`` allows for binary
tensors, so the helper's peak stays near ``20 x max_bytes``. A limit on the helper's
address space (``RLIMIT_AS``) would not do: NumPy's import alone reserves more virtual
memory than any useful limit.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

import numpy as np

from bnexport.serve.core.logs import get_logger
from bnexport.serve.protocol import codec
from bnexport.serve.protocol.errors import PayloadTooLargeError, ServeError
from bnexport.serve.settings import ServeSettings

#: JSON bodies at least this large are decoded in the helper process
DEFAULT_MIN_BYTES = 4 << 20
#: largest JSON body decoded at all (a parse peaks near 20x the body): the default body limit
DEFAULT_MAX_BYTES = ServeSettings().max_body_bytes
_REQUEST = struct.Struct("<Qi")
_ANSWER = struct.Struct("<Q")


class DecodeProcess:
    """A helper process running :func:`bnexport.serve.protocol.codec.decode_request`.

    Args:
        min_bytes: smallest JSON body sent to the helper (smaller ones parse in a thread).
        max_bytes: largest JSON body decoded at all, else 413 (:meth:`check_size`).
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.min_bytes = int(min_bytes)
        self.max_bytes = int(max_bytes)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one exchange at a time; held by worker threads

    def _process(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bnexport.serve.rest.decode_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,  # Ctrl-C goes to the server; the helper exits on EOF
            )
        return self._proc

    def start(self) -> None:
        """Start the helper now (it imports NumPy and pydantic), not on the first large body."""
        with self._lock:
            self._process()

    def check_size(self, json_bytes: int) -> None:
        """Refuse a JSON text of ``json_bytes`` above :attr:`max_bytes` with a 413.

        Raises:
            PayloadTooLargeError: the JSON is over the limit (the message names it and
                the way out: binary tensors).
        """
        if json_bytes > self.max_bytes:
            raise PayloadTooLargeError(
                f"JSON request body of {json_bytes} bytes is over the limit of "
                f"{self.max_bytes} bytes for JSON (a JSON parse takes ~20x its size in "
                "memory); send the tensors as binary data (binary_data_size; tritonclient: "
                "binary_data=True), which --max-body-mb bounds"
            )

    def decode_blocking(
        self, body: bytes | bytearray, header_length: str | None
    ) -> codec.DecodedRequest:
        """``codec.decode_request(body, header_length)`` in the helper; blocks (run in a thread).

        Raises:
            PayloadTooLargeError: a JSON-only body over :attr:`max_bytes` (not handed over).
            ServeError: the helper died (503), or what decoding raised.
        """
        if header_length is None:
            self.check_size(len(body))
        with self._lock:
            header = b"" if header_length is None else header_length.encode("utf-8", "replace")
            try:
                proc = self._process()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(
                    _REQUEST.pack(len(body), -1 if header_length is None else len(header))
                )
                proc.stdin.write(header)
                proc.stdin.write(body)
                proc.stdin.flush()
                (n,) = _ANSWER.unpack(_read_exactly(proc.stdout, _ANSWER.size))
                meta = _read_exactly(proc.stdout, n)
                (count,) = _ANSWER.unpack(_read_exactly(proc.stdout, _ANSWER.size))
                buffers = []
                for _ in range(count):
                    (size,) = _ANSWER.unpack(_read_exactly(proc.stdout, _ANSWER.size))
                    buf = np.empty(size, np.uint8)  # not zero-filled: no page touched here
                    if proc.stdout.readinto(memoryview(buf)) != size:
                        raise EOFError("decode process closed its pipe inside a buffer")
                    buffers.append(buf)
                kind, value = pickle.loads(meta, buffers=buffers)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error) as exc:
                self._kill()
                get_logger().error(
                    "JSON decode process died; a new one starts with the next large body",
                    extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}},
                )
                raise ServeError(
                    "the JSON decode process died while parsing this request (out of memory?); "
                    "retry, or send tensors as binary data",
                    status_code=503,
                ) from None
        if kind == "ok":
            return value
        raise value

    async def decode(
        self, body: bytes | bytearray, header_length: str | None
    ) -> codec.DecodedRequest:
        """:meth:`decode_blocking` from a worker thread: the event loop keeps running."""
        return await asyncio.to_thread(self.decode_blocking, body, header_length)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the helper (after the body it is parsing)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the helper exits
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError(
            f"decode process closed its pipe ({0 if not data else len(data)} of {n} bytes)"
        )
    return data


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The helper's loop: one request in, one answer out, until stdin closes."""
    while True:
        head = stdin.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            return
        size, header_len = _REQUEST.unpack(head)
        header = None if header_len < 0 else _read_exactly(stdin, header_len).decode("utf-8")
        body = _read_exactly(stdin, size)
        answer: tuple[str, Any]
        try:
            answer = ("ok", codec.decode_request(body, header))
        except ServeError as exc:
            answer = ("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the server as a 500
            answer = ("error", ServeError(f"decoding failed: {type(exc).__name__}: {exc}"))
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(answer, protocol=5, buffer_callback=buffers.append)
        stdout.write(_ANSWER.pack(len(data)))
        stdout.write(data)
        stdout.write(_ANSWER.pack(len(buffers)))
        for buf in buffers:
            raw = buf.raw()
            stdout.write(_ANSWER.pack(raw.nbytes))
            stdout.write(raw)
        stdout.flush()
        del body, answer, buffers


if __name__ == "__main__":
    # answers go to a private copy of stdout; anything printed by accident goes to stderr
    _out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, _out)
