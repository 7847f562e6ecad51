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

Errors end the RPC with a status code and a one-line message, as Triton does::

    400 malformed / wrong input         -> INVALID_ARGUMENT
    401 missing or wrong token          -> UNAUTHENTICATED
    404 unknown model or version        -> NOT_FOUND
    408 no answer within the deadline   -> DEADLINE_EXCEEDED
    413 message over --max-body-mb      -> RESOURCE_EXHAUSTED (grpc's own check)
    503 in-flight bound reached         -> RESOURCE_EXHAUSTED
    more RPCs than the in-flight bound  -> RESOURCE_EXHAUSTED (grpc's own check, see
                                           :mod:`bnexport.serve.grpc.server`)
    503 shutting down                   -> UNAVAILABLE
    500 the model failed on the request -> INTERNAL
    model control not enabled           -> FAILED_PRECONDITION

Deadline: an infer request whose call carries no deadline gets the server's
(``request_timeout_s``; ``bnexport serve`` passes ``--body-timeout-s``, the time an
HTTP request may take to arrive), so a request stuck in a model that never returns
gives its slot back with DEADLINE_EXCEEDED instead of holding it forever. A call
with its own deadline keeps it (grpc cancels the handler when it passes).

Auth: with a token, every RPC but ServerLive and ServerReady (the health
checks, open like ``/v2/health/*``) needs the metadata ``authorization: Bearer
<token>`` (scheme case-insensitive, token compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from bnexport import __version__
from bnexport.serve.core.infer_scope import InferScope
from bnexport.serve.core.logs import get_logger
from bnexport.serve.core.model_control import load_model, unload_model
from bnexport.serve.core.statistics import statistics_response
from bnexport.serve.protocol import grpc_codec
from bnexport.serve.protocol.errors import (
    RequestTimeoutError,
    ServeError,
    UnauthorizedError,
    UnavailableError,
)
from bnexport.serve.rest.routes_triton import EXTENSIONS

if TYPE_CHECKING:
    from bnexport.serve.rest.app import ServerState

#: RPCs that need no token (health checks)
_OPEN = frozenset({"ServerLive", "ServerReady"})

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: ServeError) -> grpc.StatusCode:
    """The gRPC status of a server error (see the module docstring).

    A 503 that is not :class:`UnavailableError` (shutting down) is the in-flight bound
    (``OverloadedError``): RESOURCE_EXHAUSTED, as grpc answers an over-limit call.
    """
    if exc.status_code == 503 and not isinstance(exc, UnavailableError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _CODES.get(exc.status_code, grpc.StatusCode.UNKNOWN)


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
        state: the HTTP app's :class:`~bnexport.serve.rest.app.ServerState`.
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
        self.admission = admission
        self.request_timeout_s = request_timeout_s
        self._token = token.encode() if token else None
        self._log = get_logger()
        self._rpc_counter = state.metrics.grpc_requests

    # -- shared plumbing --------------------------------------------------------------------------
    def check_token(self, context: Any) -> None:
        """Raise ``UnauthorizedError`` unless ``authorization: Bearer <token>`` is sent."""
        if self._token is None:
            return
        given = b""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        scheme, _, credential = given.strip().partition(b" ")
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._token)
        if not ok:
            raise UnauthorizedError(
                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
            )

    def record(self, rpc: str, code: grpc.StatusCode, start: float, context: Any) -> None:
        """Access log line and RPC counter of one finished RPC."""
        self._rpc_counter.labels(rpc, code.name).inc()
        if self._log.isEnabledFor(logging.INFO):
            self._log.info(
                "request",
                extra={
                    "fields": {
                        "method": "grpc",
                        "path": f"/inference.GRPCInferenceService/{rpc}",
                        "status": code.name,
                        "ms": round((time.perf_counter() - start) * 1000, 3),
                        "client": context.peer(),
                    }
                },
            )

    # -- health and metadata ----------------------------------------------------------------------
    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return service_pb2.ServerReadyResponse(ready=self.state.ready)

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        try:
            self.state.repository.get(request.name, request.version or None)
        except ServeError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self.state.ready)

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        return service_pb2.ServerMetadataResponse(
            name="bnexport", version=__version__, extensions=EXTENSIONS
        )

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        repo = self.state.repository
        model = repo.get(request.name, request.version or None)
        versions = repo.versions(request.name) if not request.version else [model.version]
        meta = model.metadata(versions).model_dump(exclude_none=True)
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        from bnexport.serve.rest.app import _config_json

        model = self.state.repository.get(request.name, request.version or None)
        config = json_format.ParseDict(_config_json(model), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=config)

    # -- statistics and repository ----------------------------------------------------------------
    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        body = statistics_response(self.state.repository, request.name, request.version)
        return json_format.ParseDict(body, service_pb2.ModelStatisticsResponse())

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        rows = self.state.repository.index()
        if request.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return json_format.ParseDict({"models": rows}, service_pb2.RepositoryIndexResponse())

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        params = grpc_codec.parameters(request.parameters)
        await load_model(self.state, request.model_name, params)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802, D102
        await unload_model(self.state, request.model_name)
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
        if self.request_timeout_s is None:
            return None
        remaining = getattr(context, "time_remaining", None)  # absent on Ray's context
        if remaining is not None and remaining() is not None:
            return None
        return self.request_timeout_s

    async def infer(self, request: Any, deadline_s: float | None = None) -> Any:
        """Answer one ``ModelInferRequest`` through the model's batcher.

        Mirrors the HTTP endpoint: look the model up, announce the request to the
        batcher, decode and validate, submit, encode. Counted in the Prometheus
        request metrics with the HTTP status it maps to.

        Args:
            request: the ``ModelInferRequest``.
            deadline_s: time from admission to the answer, else
                :class:`~bnexport.serve.protocol.errors.RequestTimeoutError` (DEADLINE_EXCEEDED);
                ``None``: no limit.

        Raises:
            ServeError: whatever ends the request (mapped to a status by the caller).
        """
        with InferScope(self.state) as scope:
            async with _admitted(self.admission, request):
                model = scope.open(request.model_name, request.model_version or None)
                if deadline_s is None:
                    response = await self._answer(scope, model, request)
                else:
                    try:
                        response = await asyncio.wait_for(
                            self._answer(scope, model, request), deadline_s
                        )
                    except asyncio.TimeoutError:
                        raise RequestTimeoutError(
                            f"model '{model.name}' version {model.version}: no answer within "
                            f"{deadline_s:g} s, the server's deadline for calls without one "
                            "(bnexport serve --body-timeout-s); set a deadline on the call "
                            "to choose another"
                        ) from None
            scope.succeeded()
            return response

    @staticmethod
    async def _answer(scope: InferScope, model: Any, request: Any) -> Any:
        """Decode and check ``request``, run it through ``scope``, encode the response."""
        if grpc_codec.typed_elements(request) > grpc_codec.OFFLOAD_ELEMENTS:
            req = await asyncio.to_thread(grpc_codec.decode_request, request)
        else:
            req = grpc_codec.decode_request(request)
        rows = model.check_inputs(req.inputs)
        model.check_outputs(req.outputs)
        results = await scope.run(req.inputs, rows)
        return grpc_codec.encode_response(
            service_pb2.ModelInferResponse,
            model.name,
            model.version,
            req.id,
            results,
            req.outputs,
        )


def _admitted(admission: Any, request: Any) -> Any:
    """The server's admission bound (when it has one) for a request of its message size."""
    if admission is None:
        return contextlib.nullcontext()
    return admission.admit(request.ByteSize())
