"""KServe v2 / Triton ``inference.GRPCInferenceService`` over the HTTP server's state.

The servicer subclasses the generated base class shipped with ``tritonclient[grpc]``
(``service_pb2_grpc.GRPCInferenceServiceServicer``) and shares everything with
the HTTP endpoints: the model repository, the per-model dynamic batcher, the
admission bound, the token, the logs and the Prometheus metrics (an infer
request is counted in ``bnexport_requests_total`` with the HTTP status it would
have had; every RPC also in ``bnexport_grpc_requests_total{method, code}``).

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelConfig, ModelInfer, ModelStreamInfer, ModelStatistics, RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload. The shared-memory, trace and log
settings RPCs answer UNIMPLEMENTED (the base class).

Every RPC is answered by the data plane (:mod:`bnexport.serve.core.dataplane`), the one
the HTTP routes call: this module only turns messages into its calls and back.

Errors end the RPC with a status code and a one-line message, as Triton does; the
code comes from the table in :mod:`bnexport.serve.protocol.errors`, next to the HTTP
status of the same error (400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 408 ->
DEADLINE_EXCEEDED, 503 in-flight bound -> RESOURCE_EXHAUSTED, 503 shutting down ->
UNAVAILABLE, ...). grpc itself answers RESOURCE_EXHAUSTED to a message over
``--max-body-mb`` and to an RPC beyond ``maximum_concurrent_rpcs`` (see
:mod:`bnexport.serve.grpc.server`).

Deadline: an infer request whose call carries no deadline gets the server's
(``request_timeout_s``; ``bnexport serve`` passes ``--body-timeout-s``, the time an
HTTP request may take to arrive), so a request stuck in a model that never returns
gives its slot back with DEADLINE_EXCEEDED instead of holding it forever. A call
with its own deadline keeps it (grpc cancels the handler when it passes).

Auth: with a token, every RPC but ServerLive and ServerReady (the health
checks, open like ``/v2/health/*``) needs the metadata ``authorization: Bearer
<token>``, checked by :mod:`bnexport.serve.core.auth` as the HTTP header is.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bnexport.serve.core.auth import BearerToken
from bnexport.serve.core.dataplane import DataPlane
from bnexport.serve.core.logs import get_logger, log_access
from bnexport.serve.protocol import grpc_codec
from bnexport.serve.protocol.codec import DecodedRequest
from bnexport.serve.protocol.errors import ModelNotFoundError, ServeError, grpc_code_name

if TYPE_CHECKING:
    from bnexport.serve.core.state import ServerState

#: RPCs that need no token (health checks)
_OPEN = frozenset({"ServerLive", "ServerReady"})
_SERVICE = "/inference.GRPCInferenceService/"


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status of an error (the table of :mod:`bnexport.serve.protocol.errors`)."""
    return grpc.StatusCode[grpc_code_name(exc)]


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap one unary RPC: token check, error -> status code, access log, RPC counter."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: Any) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if name not in _OPEN:
                self.check_token(context)
            return await method(self, request, context)
        except ServeError as exc:
            code = status_code(exc)
            await context.abort(code, str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):  # context.abort inside the method
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            code = grpc.StatusCode.INTERNAL
            get_logger().error("grpc handler failed", exc_info=exc, extra={"fields": {"rpc": name}})
            await context.abort(code, f"{name}: {type(exc).__name__}: {exc}")
        finally:
            self.record(name, code, start, context)

    return wrapper


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` answering from ``state`` (shared with HTTP).

    Args:
        state: the server's :class:`~bnexport.serve.core.state.ServerState` (the HTTP
            app's ``app.state``).
        token: bearer token required on every RPC but ServerLive/ServerReady.
        admission: the HTTP app's :class:`~bnexport.serve.core.admission.Admission` (in-flight
            bound, shared by both protocols); a request over it gets RESOURCE_EXHAUSTED.
        request_timeout_s: deadline of an infer request whose call has none
            (DEADLINE_EXCEEDED after it); ``None``: no server deadline.
    """

    def __init__(
        self,
        state: ServerState,
        token: str | None = None,
        admission: Any = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.state = state
        self.dataplane = DataPlane(state, admission, request_timeout_s)
        self._token = BearerToken(token)
        self._log = get_logger()
        self._rpc_counter = state.metrics.grpc_requests

    @property
    def admission(self) -> Any:
        """The in-flight bound shared with HTTP (``None``: none)."""
        return self.dataplane.admission

    @property
    def request_timeout_s(self) -> float | None:
        """The deadline of an infer request whose call carries none."""
        return self.dataplane.request_timeout_s

    # -- shared plumbing --------------------------------------------------------------------------
    def check_token(self, context: Any) -> None:
        """Raise ``UnauthorizedError`` unless ``authorization: Bearer <token>`` is sent."""
        if not self._token.required:
            return
        given = next(
            (v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"),
            None,
        )
        self._token.check(given, "metadata 'authorization: Bearer <token>'")

    def record(self, rpc: str, code: grpc.StatusCode, start: float, context: Any) -> None:
        """Access log line and RPC counter of one finished RPC."""
        self._rpc_counter.labels(rpc, code.name).inc()
        log_access(
            self._log,
            method="grpc",
            path=_SERVICE + rpc,
            status=code.name,
            start=start,
            client=context.peer(),
        )

    # -- health and metadata ----------------------------------------------------------------------
    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return service_pb2.ServerLiveResponse(live=self.dataplane.live())

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return service_pb2.ServerReadyResponse(ready=self.dataplane.ready())

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        try:
            ready = self.dataplane.model_ready(request.name, request.version)
        except ModelNotFoundError:
            ready = False  # Triton answers an unknown model "not ready", not NOT_FOUND
        return service_pb2.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return service_pb2.ServerMetadataResponse(**self.dataplane.server_metadata())

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        meta = self.dataplane.model_metadata(request.name, request.version)
        return json_format.ParseDict(
            meta.model_dump(exclude_none=True), service_pb2.ModelMetadataResponse()
        )

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        config = self.dataplane.model_config(request.name, request.version)
        return service_pb2.ModelConfigResponse(config=config)

    # -- statistics and repository ----------------------------------------------------------------
    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        body = self.dataplane.statistics(request.name, request.version)
        return json_format.ParseDict(body, service_pb2.ModelStatisticsResponse())

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        rows = self.dataplane.repository_index(request.ready)
        return json_format.ParseDict({"models": rows}, service_pb2.RepositoryIndexResponse())

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        params = grpc_codec.parameters(request.parameters)
        await self.dataplane.load(request.model_name, params)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        await self.dataplane.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    # -- inference --------------------------------------------------------------------------------
    @_rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return await self.infer(request, self._deadline(context))

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[Any]:
        """Bidirectional stream: each request is answered (in completion order) as it finishes.

        Requests of one stream run concurrently, so they are batched together; an
        error ends only its own request, with ``error_message`` set.
        """
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            self.check_token(context)
        except ServeError as exc:
            self.record("ModelStreamInfer", status_code(exc), start, context)
            await context.abort(status_code(exc), str(exc))
        answers: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        deadline = self._deadline(context)  # per request of the stream

        async def answer(req: Any) -> None:
            try:
                reply = await self.infer(req, deadline)
                msg = service_pb2.ModelStreamInferResponse(infer_response=reply)
            except ServeError as exc:
                msg = service_pb2.ModelStreamInferResponse(error_message=str(exc))
            except Exception as exc:  # noqa: BLE001 - answered, never left pending
                get_logger().error("stream request failed", exc_info=exc)
                text = f"ModelStreamInfer: {type(exc).__name__}: {exc}"
                msg = service_pb2.ModelStreamInferResponse(error_message=text)
            await answers.put(msg)

        async def read() -> None:
            async for req in request_iterator:
                task = asyncio.ensure_future(answer(req))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
            await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (msg := await answers.get()) is not None:
                yield msg
            await reader
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
            self.record("ModelStreamInfer", code, start, context)

    def _deadline(self, context: Any) -> float | None:
        """The server's deadline for the call's requests: none when the call has its own."""
        remaining = getattr(context, "time_remaining", None)  # absent on Ray's context
        if remaining is not None and remaining() is not None:
            return None
        return self.dataplane.request_timeout_s

    async def infer(self, request: Any, deadline_s: float | None = None) -> Any:
        """Answer one ``ModelInferRequest`` through the data plane (as HTTP's endpoint does).

        The request holds its message size under the admission bound while it runs, and
        is counted in the Prometheus request metrics with the HTTP status it maps to.

        Args:
            request: the ``ModelInferRequest``.
            deadline_s: time from arrival to the answer, else
                :class:`~bnexport.serve.protocol.errors.RequestTimeoutError` (DEADLINE_EXCEEDED);
                ``None``: no limit.

        Raises:
            ServeError: whatever ends the request (mapped to a status by the caller).
        """

        async def decode() -> DecodedRequest:
            if grpc_codec.typed_elements(request) > grpc_codec.OFFLOAD_ELEMENTS:
                return await asyncio.to_thread(grpc_codec.decode_request, request)
            return grpc_codec.decode_request(request)

        return await self.dataplane.infer(
            request.model_name,
            request.model_version,
            decode,
            _encode,
            cost=request.ByteSize(),
            deadline_s=deadline_s,
        )


def _encode(model: Any, req: DecodedRequest, results: dict) -> Any:
    """The ``ModelInferResponse`` of one answered request (outputs as raw bytes)."""
    return grpc_codec.encode_response(
        service_pb2.ModelInferResponse, model.name, model.version, req.id, results, req.outputs
    )
