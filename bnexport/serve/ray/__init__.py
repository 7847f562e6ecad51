"""bnexport's server as Ray Serve replicas (extra ``bnexport[ray]``).

- :func:`serve_replicas`: serve a model or repository as N replicas behind Ray's
  HTTP and gRPC proxies until SIGTERM (``bnexport serve --replicas N``).
- :class:`RayServer`: start, resize (:meth:`RayServer.deploy`) and stop them.
- :class:`ReplicaOptions`: replicas, Ray address, GPUs per replica, autoscaling.

The replicas take the one-process server's :class:`bnexport.serve.settings.ServeSettings`.
Names are imported on first use: ``import bnexport.serve.ray`` does not import Ray.
"""

from __future__ import annotations

from bnexport.lazy_names import lazy_names

_LAZY = {
    "serve_replicas": "bnexport.serve.ray.driver",
    "RayServer": "bnexport.serve.ray.driver",
    "ReplicaStartError": "bnexport.serve.ray.driver",
    "ReplicaOptions": "bnexport.serve.ray.options",
    "parse_autoscale": "bnexport.serve.ray.options",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
