"""One Ray Serve replica: bnexport's app and gRPC servicer over one loaded model repository.

Each replica loads the models itself (:func:`bnexport.serve.loading.load_app`,
the same assembly as the one-process server) and serves:

- HTTP: Ray's HTTP proxy forwards each request to a replica's ASGI app
  (``__serve_build_asgi_app__``): the whole KServe v2 app with its guard (token,
  body limit, in-flight bound), batching, statistics and ``/metrics``;
- gRPC: Ray's gRPC proxy forwards the request bytes of
  ``inference.GRPCInferenceService/<RPC>`` to the replica method of that name
  (see :mod:`bnexport.serve.ray.grpc_ingress`), which parses them and calls
  :class:`bnexport.serve.grpc.service.InferenceServicer`, as the one-process
  server does. Errors end the RPC with the servicer's status code and message,
  set on Ray's gRPC context (no exception reaches Ray, so its proxy logs no
  traceback for a client's mistake).

Both protocols share the replica's batcher and in-flight bound; the app's lifespan
(started and stopped by Ray) drains the batchers when Ray stops the replica.

This module imports Ray; :mod:`bnexport.serve.ray` imports it only when a
deployment is built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import ray
from ray import serve

from bnexport.errors import BnexportError
from bnexport.serve.loading import load_app, prepare_process
from bnexport.serve.ray.grpc_ingress import UNARY_RPCS, empty_response, parse_request
from bnexport.serve.ray.metrics_board import BOARD_NAME, ReplicaMetrics
from bnexport.serve.ray.options import NAMESPACE
from bnexport.serve.settings import ServeSettings

#: the first words of a replica's load failure, found again in Ray's error text
LOAD_FAILED = "bnexport replica could not load its model:"


class ReplicaLoadError(RuntimeError):
    """A replica could not load its models (the message is one line, after :data:`LOAD_FAILED`)."""


class RayContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses, over Ray's gRPC context.

    ``abort`` records the status on Ray's context (the proxy sends it to the client)
    and raises ``grpc.aio.AbortError``, as grpc's own ``abort`` does.
    """

    def __init__(self, ray_context: Any) -> None:
        self._ctx = ray_context

    def invocation_metadata(self) -> list[tuple[str, str]]:  # noqa: D102
        return list(self._ctx.invocation_metadata()) if self._ctx is not None else []

    def peer(self) -> str:  # noqa: D102
        return self._ctx.peer() if self._ctx is not None else ""

    def code(self) -> grpc.StatusCode | None:  # noqa: D102
        return self._ctx.code() if self._ctx is not None else None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:  # noqa: D102
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
        raise grpc.aio.AbortError(details)


def _rpc_method(rpc: str) -> Callable[..., Awaitable[Any]]:
    """The replica method Ray's gRPC proxy calls for ``inference.GRPCInferenceService/rpc``."""

    async def method(self: BnexportReplica, request: bytes, grpc_context: Any = None) -> Any:
        context = RayContext(grpc_context)
        try:
            message = parse_request(rpc, request)
        except Exception as exc:  # noqa: BLE001 - a malformed message is the client's error
            await _abort_quietly(context, grpc.StatusCode.INVALID_ARGUMENT, f"{rpc}: {exc}")
            return empty_response(rpc)
        try:
            return await getattr(self.servicer, rpc)(message, context)
        except grpc.aio.AbortError:  # status and message are on Ray's context
            return empty_response(rpc)

    method.__name__ = method.__qualname__ = rpc
    method.__doc__ = f"gRPC ``{rpc}`` through Ray Serve's gRPC proxy."
    return method


async def _abort_quietly(context: RayContext, code: grpc.StatusCode, details: str) -> None:
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        pass


class BnexportReplica:
    """Loads the models and builds the app; Ray's ingress wrapper (below) serves it.

    Args:
        path: an ``.onnx`` file or a model repository, readable where the replica runs.
        settings: the server's settings (the same object the one-process server takes).
    """

    def __init__(self, path: str, settings: ServeSettings) -> None:
        from bnexport.serve.grpc.service import InferenceServicer

        prepare_process(settings)  # logging and GIL switch interval, as the one-process server
        self.metrics = ReplicaMetrics(serve.get_replica_context().replica_tag)
        self._metrics_sync: asyncio.Task | None = None
        try:
            self.bnexport_app = load_app(path, settings, self.metrics)
        except BnexportError as exc:
            # one line the driver finds in Ray's error text (no traceback needed: it is
            # the user's model or path, not a bug)
            raise ReplicaLoadError(f"{LOAD_FAILED} {exc}") from None
        self.servicer = InferenceServicer(
            self.bnexport_app.state, settings.token, self.bnexport_app.admission
        )

    async def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app Ray's HTTP proxy sends requests to (its lifespan is run by Ray).

        Also starts posting this replica's metrics to the driver's board (see
        :mod:`bnexport.serve.ray.metrics_board`), on the replica's event loop.
        """
        try:
            board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
        except ValueError:  # deployed without the driver: /metrics shows this replica only
            board = None
        if board is not None:
            self._metrics_sync = asyncio.create_task(self.metrics.sync_forever(board))
        return self.bnexport_app

    async def __del__(self) -> None:
        """Ray stops the replica (after the app's lifespan drained it): leave the board."""
        if self._metrics_sync is not None:
            self._metrics_sync.cancel()
            await self.metrics.leave()


for _rpc in UNARY_RPCS:
    setattr(BnexportReplica, _rpc, _rpc_method(_rpc))

# Ray's ingress wrapper keeps the class's module and name, so Ray pickles the deployment
# by reference to this module attribute: it must name the wrapped class.
BnexportReplica = serve.ingress()(BnexportReplica)  # type: ignore[misc]
