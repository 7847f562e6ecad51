"""Deprecated module path, kept for one release: the plugin is :mod:`.tensorrt_plugin`.

- :func:`build_engine` is a thin alias of the project's one TensorRT builder,
  :func:`bnexport.runtime.trt_build.build_engine`; it warns with ``DeprecationWarning``.
  It is the only import of :mod:`bnexport.runtime` by ``bnexport_plugins``: the runtime
  uses the plugin, never the other way round, and the plugin definition itself moved to
  :mod:`bnexport_plugins.fused_norm.tensorrt_plugin` so that the builder, which registers
  the plugin, and this alias, which calls the builder, do not import each other.
- Every other name (``register_fused_norm_plugin``, ``Tactic``, ``aot_kernel`` ...) is
  read from :mod:`.tensorrt_plugin`, with a ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from bnexport_plugins.fused_norm import tensorrt_plugin as _plugin


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"bnexport_plugins.fused_norm.trt_plugin.{name} is deprecated; use {instead}",
        DeprecationWarning,
        stacklevel=3,
    )


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    *,
    fp16: bool = False,
    bf16: bool = False,
    tf32: bool = False,
    workspace_bytes: int = 1 << 30,
    profiles: list[dict[str, tuple[tuple[int, ...], ...]]] | None = None,
    prefer_aot: bool = True,
    timing_cache: str | os.PathLike | None = None,
) -> bytes:
    """Deprecated: :func:`bnexport.runtime.trt_build.build_engine` with ``precision=``.

    ``fp16=True`` is ``precision="fp16"``, ``bf16=True`` is ``precision="bf16"``; the other
    arguments are passed as they are. Returns the serialized engine.

    Raises:
        UsageError: ``fp16`` and ``bf16`` together.
    """
    from bnexport.errors import UsageError
    from bnexport.runtime.trt_build import build_engine as one_builder

    _deprecated("build_engine", "bnexport.runtime.trt_build.build_engine(..., precision=)")
    if fp16 and bf16:
        raise UsageError("build_engine: choose fp16 or bf16, not both")
    return one_builder(
        onnx_path,
        engine_path,
        precision="fp16" if fp16 else "bf16" if bf16 else "fp32",
        tf32=tf32,
        workspace_bytes=workspace_bytes,
        profiles=tuple(profiles or ()),
        prefer_aot=prefer_aot,
        timing_cache=timing_cache,
    )


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_plugin, name)  # AttributeError for a name that never existed
    _deprecated(name, f"bnexport_plugins.fused_norm.tensorrt_plugin.{name}")
    return value
