"""Engine cache and optimization-profile shapes for the TensorRT backend.

Everything here is pure Python (no TensorRT, no CUDA), so it is tested on
machines without a GPU.

An engine is valid only for the exact ONNX bytes, TensorRT version, GPU and
build flags it was built with -- and, for graphs with ``bnexport::FusedNorm``, the
plugin code and kernel source compiled into it (the ahead-of-time PTX is embedded in
the engine) -- so the cache key is::

    sha256(sha256(onnx bytes) | tensorrt version | gpu name | sorted flags as JSON
           [| plugin digest])

:func:`plugin_digest` hashes every source file of ``bnexport_plugins.fused_norm``
(``fused_norm.cu`` and the Python modules that register, plan and launch it) and
``$BNEXPORT_PTX_ISA`` (the PTX version cap), so editing the kernel or the plugin
rebuilds the engine instead of loading a stale one.

Engines live in ``$BNEXPORT_CACHE_DIR`` (default ``~/.cache/bnexport/engines``)
as ``<key>.engine``; the timing cache, which TensorRT can share between builds
of different networks on one GPU, lives next to them as
``timing-<trt version>-<gpu>.cache``. Files are written atomically
(temporary file + ``os.replace``) so concurrent builders never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnexport.atomic_write import write_bytes_atomic
from bnexport.errors import InputError
from bnexport.runtime.io_check import TensorInfo

#: default largest batch of a TensorRT optimization profile when ``max_batch`` is not given
DEFAULT_TRT_MAX_BATCH = 32

Shape = tuple[int, ...]


def cache_dir() -> Path:
    """The engine cache folder: ``$BNEXPORT_CACHE_DIR`` or ``~/.cache/bnexport/engines``."""
    env = os.environ.get("BNEXPORT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bnexport" / "engines"


def onnx_digest(model_bytes: bytes) -> str:
    """Hex SHA-256 of the serialized ONNX model."""
    return hashlib.sha256(model_bytes).hexdigest()


#: suffixes of the plugin files that change what an engine computes
_PLUGIN_SOURCES = (".py", ".cu", ".cuh", ".h")


def plugin_digest() -> str:
    """Hex SHA-256 of the FusedNorm plugin as it would be compiled into an engine.

    Covers the name and bytes of every ``.py``/``.cu``/``.cuh``/``.h`` file of
    ``bnexport_plugins.fused_norm`` (kernel source, registration, launch plans, NVRTC
    options) and ``$BNEXPORT_PTX_ISA``.
    """
    import bnexport_plugins.fused_norm as package

    root = Path(package.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in _PLUGIN_SOURCES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(b"BNEXPORT_PTX_ISA=" + os.environ.get("BNEXPORT_PTX_ISA", "").encode())
    return digest.hexdigest()


def engine_cache_key(
    model_bytes: bytes,
    trt_version: str,
    gpu_name: str,
    flags: Mapping[str, Any],
    plugin: str | None = None,
) -> str:
    """Key of an engine: hash of ONNX digest, TensorRT version, GPU name and build flags.

    Args:
        model_bytes: the serialized ONNX model the engine is built from.
        trt_version: ``tensorrt.__version__``.
        gpu_name: the device name (``cudaDeviceProp.name``).
        flags: every build setting that changes the engine (precision, tf32,
            profile shapes, workspace...); must be JSON-serializable.
        plugin: :func:`plugin_digest` for graphs that use the FusedNorm plugin.

    Returns:
        A 64-character hex string.
    """
    parts = [onnx_digest(model_bytes), trt_version, gpu_name, json.dumps(flags, sort_keys=True)]
    if plugin is not None:
        parts.append(f"plugin={plugin}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unknown"


def timing_cache_path(trt_version: str, gpu_name: str, root: Path | None = None) -> Path:
    """Path of the timing cache shared by builds with this TensorRT version on this GPU."""
    return (root or cache_dir()) / f"timing-{_slug(trt_version)}-{_slug(gpu_name)}.cache"


class EngineCache:
    """A folder of serialized engines addressed by :func:`engine_cache_key`."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()

    def path(self, key: str) -> Path:
        """Where the engine with ``key`` is stored."""
        return self.root / f"{key}.engine"

    def get(self, key: str) -> bytes | None:
        """The serialized engine for ``key``, or ``None`` when not cached."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, engine_bytes: bytes) -> Path:
        """Store an engine atomically; returns its path."""
        path = self.path(key)
        write_bytes_atomic(path, bytes(engine_bytes), make_parents=True)
        return path


def profile_shapes(
    inputs: Sequence[TensorInfo],
    max_batch: int,
    opt_batch: int | None = None,
    overrides: Mapping[str, tuple[Shape, Shape, Shape]] | None = None,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes of a TensorRT optimization profile.

    A dynamic leading (batch) dimension spans ``1..max_batch`` with the optimum
    at ``opt_batch`` (default ``max_batch``, the throughput case). A static
    leading dimension stays as is. Any other dynamic dimension cannot be guessed
    and must come from ``overrides``.

    Args:
        inputs: the network inputs.
        max_batch: the largest batch the engine accepts (>= 1).
        opt_batch: the batch TensorRT tunes kernels for, ``1 <= opt_batch <= max_batch``.
        overrides: explicit ``{input name: (min, opt, max)}`` for inputs with
            other dynamic dimensions.

    Returns:
        ``{input name: (min shape, opt shape, max shape)}``.

    Raises:
        InputError: invalid batch bounds, or a dynamic non-batch dimension without an override.
    """
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1. Received: max_batch={max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise InputError(
            f"opt_batch must be in [1, max_batch]. Received: opt_batch={opt_batch}, "
            f"max_batch={max_batch}"
        )
    overrides = dict(overrides or {})
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for info in inputs:
        if info.name in overrides:
            lo, mid, hi = (tuple(int(d) for d in s) for s in overrides[info.name])
            shapes[info.name] = (lo, mid, hi)
            continue
        if info.shape is None:
            raise InputError(
                f"input {info.name!r} has no shape in the graph; give its (min, opt, max) shapes"
            )
        if not info.shape:
            shapes[info.name] = ((), (), ())
            continue
        rest = info.shape[1:]
        dynamic = [i + 1 for i, d in enumerate(rest) if d is None]
        if dynamic:
            raise InputError(
                f"input {info.name!r} ({info.describe()}) has dynamic dimension(s) {dynamic} "
                "besides the batch; give its (min, opt, max) shapes explicitly"
            )
        fixed = tuple(int(d) for d in rest)
        if info.shape[0] is None:
            shapes[info.name] = ((1, *fixed), (opt, *fixed), (max_batch, *fixed))
        else:
            full = (int(info.shape[0]), *fixed)
            shapes[info.name] = (full, full, full)
    return shapes
