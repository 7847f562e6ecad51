"""bnexport's server as Ray Serve replicas (extra ``bnexport[ray]``).

- :func:`serve_replicas`: serve a model or repository as N replicas behind Ray's
  HTTP and gRPC proxies until SIGTERM (``bnexport serve --replicas N``).
- :class:`RayServer`: start, resize (:meth:`RayServer.deploy`) and stop them.
- :class:`ReplicaOptions`: replicas, Ray address, GPUs per replica, autoscaling.

The replicas take the one-process server's :class:`bnexport.serve.settings.ServeSettings`.
Names are imported on first use: ``import bnexport.serve.ray`` does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "serve_replicas": "bnexport.serve.ray.driver",
    "RayServer": "bnexport.serve.ray.driver",
    "ReplicaStartError": "bnexport.serve.ray.driver",
    "ReplicaOptions": "bnexport.serve.ray.options",
    "parse_autoscale": "bnexport.serve.ray.options",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnexport.serve.ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
