"""Triton's binary-tensor extension to the KServe v2 HTTP protocol.

A request or response body is either plain JSON, or a JSON header followed by
raw tensor bytes::

    body = JSON header (N bytes) | tensor 0 bytes | tensor 1 bytes | ...

``N`` travels in the ``Inference-Header-Content-Length`` HTTP header. Each
tensor sent this way names its byte count in ``parameters.binary_data_size``
and carries no ``data`` field; tensors appear in the body in the order they are
listed in the header. Elements are little-endian, row-major. ``BYTES`` elements
are each a 4-byte little-endian length followed by that many bytes.

A client asks for a binary output with ``outputs[i].parameters.binary_data``
or, for every output, with the request parameter ``binary_data_output``.
"""

from __future__ import annotations

import struct

import numpy as np

#: HTTP header naming the size of the JSON part of a binary body
HEADER_LENGTH = "Inference-Header-Content-Length"


class BinaryFormatError(ValueError):
    """The body does not follow the binary-tensor framing (names the tensor at fault)."""


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Split a request body into its JSON header and its binary tail.

    Args:
        body: the whole HTTP body.
        header_length: value of the ``Inference-Header-Content-Length`` header, or
            ``None`` when the body is plain JSON.

    Returns:
        ``(json_bytes, binary_tail)``; the tail is empty for a plain JSON body.

    Raises:
        BinaryFormatError: the header length is not an integer in ``[0, len(body)]``.
    """
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise BinaryFormatError(
            f"{HEADER_LENGTH} must be an integer. Received: {header_length!r}"
        ) from None
    if not 0 <= n <= len(body):
        raise BinaryFormatError(f"{HEADER_LENGTH}={n} is outside the body of {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


class BinaryReader:
    """Hands out consecutive slices of a body's binary tail, checking bounds."""

    def __init__(self, tail: memoryview) -> None:
        self._tail = tail
        self._offset = 0

    def take(self, name: str, size: int) -> memoryview:
        """Return the next ``size`` bytes, those of tensor ``name``."""
        if size < 0:
            raise BinaryFormatError(f"input '{name}': binary_data_size must be >= 0, got {size}")
        end = self._offset + size
        if end > len(self._tail):
            raise BinaryFormatError(
                f"input '{name}': binary_data_size={size} overruns the body "
                f"({len(self._tail) - self._offset} bytes left)"
            )
        chunk = self._tail[self._offset : end]
        self._offset = end
        return chunk

    def check_consumed(self) -> None:
        """Raise when bytes are left over after every binary input was read."""
        left = len(self._tail) - self._offset
        if left:
            raise BinaryFormatError(f"{left} bytes of binary data follow the last binary input")


def deserialize_bytes(buf: memoryview | bytes, name: str) -> np.ndarray:
    """Decode ``BYTES`` elements (4-byte LE length + payload each) into an object array."""
    items: list[bytes] = []
    raw = bytes(buf)
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BinaryFormatError(f"input '{name}': truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BinaryFormatError(f"input '{name}': BYTES element overruns its buffer")
        items.append(raw[offset : offset + length])
        offset += length
    return np.array(items, dtype=np.object_)


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Encode an object/bytes/str array as ``BYTES`` elements, row-major."""
    parts = []
    for item in arr.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def tensor_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian row-major bytes of a tensor (``BYTES`` framing for objects)."""
    if arr.dtype == np.object_ or arr.dtype.kind in "SU":
        return serialize_bytes(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def join_body(header_json: bytes, chunks: list[bytes]) -> tuple[bytes, int | None]:
    """Build a response body: the JSON header, then every binary chunk.

    Returns:
        ``(body, header_length)``; ``header_length`` is ``None`` when there is no
        binary chunk (plain JSON, no ``Inference-Header-Content-Length`` header).
    """
    if not chunks:
        return header_json, None
    return b"".join([header_json, *chunks]), len(header_json)
