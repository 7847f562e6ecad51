"""The data plane: every KServe v2 / Triton operation, free of any transport.

The HTTP routes (:mod:`bnexport.serve.rest`) and the gRPC servicer
(:mod:`bnexport.serve.grpc`) only translate: wire form -> a call here -> wire form, and a
:class:`~bnexport.serve.protocol.errors.ServeError` -> their status (one table,
:mod:`bnexport.serve.protocol.errors`). So a rule (a limit, a validation, a statistic, a
deadline) is written once and both protocols follow it, as in MLServer's ``DataPlane``
and kserve's ``dataplane.py``.

An inference request, on either transport::

    scope  = InferScope(state)                 # in flight, counted, timed
    [admission.admit(cost)]                    # gRPC: its message size; HTTP: the guard did it
    model  = scope.open(name, version)         # lookup + batcher.expect(), no await between
    req    = await decode()                    # the transport's codec -> DecodedRequest
    rows   = model.check_inputs(req.inputs)    # names, dtypes, shapes vs the model
    model.check_outputs(req.outputs)
    Y      = await scope.run(req.inputs, rows) # merged with concurrent requests
    answer = encode(model, req, Y)             # the transport's codec

with the whole of it under the server's deadline when one is set (a stuck model then
gives its slot back with 408 / DEADLINE_EXCEEDED). Checking and encoding of large
tensors (over :data:`OFFLOAD_BYTES`) run in a worker thread, so the event loop, and the
health probes with it, never wait on one request's bytes; small ones stay on the loop,
where a thread handoff would cost more than the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from bnexport import __version__
from bnexport.serve.core.infer_scope import InferScope
from bnexport.serve.core.model_control import load_model, unload_model
from bnexport.serve.core.state import ServerState
from bnexport.serve.core.statistics import statistics_response
from bnexport.serve.protocol.codec import DecodedRequest, datatype_of
from bnexport.serve.protocol.errors import RequestTimeoutError
from bnexport.serve.protocol.types import ModelMetadataResponse
from bnexport.serve.triton.config import TensorConfig, model_config, triton_data_type

#: tensors above this many bytes are checked / encoded in a worker thread
OFFLOAD_BYTES = 256 << 10
#: Triton extensions both protocols announce in their server metadata
EXTENSIONS = ["model_configuration", "model_repository", "statistics"]
SERVER_NAME = "bnexport"

T = TypeVar("T")
#: the transport's decoder of one request (reads and parses its wire form)
Decode = Callable[[], Awaitable[DecodedRequest]]
#: the transport's encoder of one answer: (model, request, outputs) -> wire form
Encode = Callable[[Any, DecodedRequest, dict], T]


async def _within(answer: Awaitable[T], delay: float) -> T:
    """``await answer``, cancelled with ``asyncio.TimeoutError`` after ``delay`` seconds."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(delay):  # a timer on this task: no extra task per request
            return await answer
    return await asyncio.wait_for(answer, delay)  # pragma: no cover - Python 3.10


class DataPlane:
    """The server's operations over ``state``, for any transport.

    Args:
        state: the server's shared state (models, batchers, metrics, readiness).
        admission: the in-flight bound (:class:`~bnexport.serve.core.admission.Admission`)
            that :meth:`infer` applies when given a ``cost``; ``None``: none.
        request_timeout_s: the server's deadline of an inference request, from arrival to
            its answer (408 / DEADLINE_EXCEEDED after it); ``None``: none. Transports pass it
            to :meth:`infer` unless the call carries a deadline of its own.
    """

    def __init__(
        self,
        state: ServerState,
        admission: Any = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.state = state
        self.admission = admission
        self.request_timeout_s = request_timeout_s

    # -- health and metadata ----------------------------------------------------------------------
    def live(self) -> bool:
        """The server process answers (always true once it does)."""
        return True

    def ready(self) -> bool:
        """Ready for inference: false from the first shutdown signal on."""
        return self.state.ready

    def server_metadata(self, extensions: tuple[str, ...] = ()) -> dict[str, Any]:
        """``{"name", "version", "extensions"}``; ``extensions``: the transport's own ones."""
        return {
            "name": SERVER_NAME,
            "version": __version__,
            "extensions": [*extensions, *EXTENSIONS],
        }

    def model_metadata(self, name: str, version: str | None) -> ModelMetadataResponse:
        """KServe model metadata (all versions when ``version`` is not given).

        Raises:
            ModelNotFoundError: unknown model or version.
        """
        repository = self.state.repository
        model = repository.get(name, version or None)
        return model.metadata(repository.versions(name) if not version else [model.version])

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether model ``name`` (at ``version``) serves requests now.

        Raises:
            ModelNotFoundError: unknown model or version.
        """
        self.state.repository.get(name, version or None)
        return self.state.ready

    def model_config(self, name: str, version: str | None) -> Any:
        """Triton's ``inference.ModelConfig`` message of a served model.

        ``max_batch_size`` is the merged batch limit of a batchable model (0 when its
        requests are never merged; the batch dimension is then part of ``dims``),
        ``dynamic_batching`` carries its batching window. The HTTP body is the same message
        as JSON (:func:`bnexport.serve.triton.config.config_json`).

        Raises:
            ModelNotFoundError: unknown model or version.
        """
        model = self.state.repository.get(name, version or None)
        batched = model.batchable and model.max_batch > 1

        def tensors(infos: list) -> list[TensorConfig]:
            out = []
            for t in infos:
                dims = tuple(-1 if d is None else int(d) for d in t.shape)
                data_type = triton_data_type(datatype_of(t.dtype))
                out.append(TensorConfig(t.name, data_type, dims[1:] if batched else dims))
            return out

        return model_config(
            model.name,
            "",
            tensors(model.inputs),
            tensors(model.outputs),
            max_batch=model.max_batch if batched else 0,
            queue_delay_us=int(model.batch_timeout_s * 1e6),
            platform=model.platform,
        )

    # -- statistics and repository ----------------------------------------------------------------
    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Triton's ``{"model_stats": [...]}`` (every model when ``name`` is empty).

        Raises:
            ModelNotFoundError: unknown model or version.
        """
        return statistics_response(self.state.repository, name, version)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository's models: ``{"name", "version", "state", "reason"}`` rows."""
        rows = self.state.repository.index()
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    async def load(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """(Re)load model ``name`` (see :func:`bnexport.serve.core.model_control.load_model`)."""
        await load_model(self.state, name, parameters)

    async def unload(self, name: str) -> None:
        """Unload model ``name`` (see :func:`bnexport.serve.core.model_control.unload_model`)."""
        await unload_model(self.state, name)

    # -- inference --------------------------------------------------------------------------------
    async def infer(
        self,
        name: str,
        version: str | None,
        decode: Decode,
        encode: Encode[T],
        *,
        cost: int | None = None,
        deadline_s: float | None = None,
    ) -> T:
        """Answer one inference request (see the module docstring for the steps).

        Args:
            name: the model.
            version: its version, ``None``/empty for the default one.
            decode: reads and parses the request (the transport's codec).
            encode: ``encode(model, request, outputs)``, the answer in the transport's form.
            cost: bytes to hold under the admission bound while the request runs;
                ``None``: the transport admitted it already (HTTP's guard).
            deadline_s: time from arrival to the answer, else 408 / DEADLINE_EXCEEDED;
                ``None``: none. Transports pass :attr:`request_timeout_s` unless the call
                carries a deadline of its own.

        Raises:
            ServeError: what ended the request (its status tells the transport which).
        """
        admitted = (
            contextlib.nullcontext()
            if cost is None or self.admission is None
            else self.admission.admit(cost)
        )
        with InferScope(self.state) as scope:
            async with admitted:  # before the batcher is told to expect the request
                model = scope.open(name, version or None)
                if deadline_s is None:
                    answer = await self._answer(scope, model, decode, encode)
                else:
                    try:
                        answer = await _within(
                            self._answer(scope, model, decode, encode), deadline_s
                        )
                    except asyncio.TimeoutError:
                        raise RequestTimeoutError(
                            f"model '{model.name}' version {model.version}: no answer within "
                            f"{deadline_s:g} s, the server's deadline for requests "
                            "(bnexport serve --body-timeout-s); a gRPC call may set a "
                            "deadline of its own"
                        ) from None
            scope.succeeded()
            return answer

    @staticmethod
    async def _answer(scope: InferScope, model: Any, decode: Decode, encode: Encode[T]) -> T:
        """Decode, check, run and encode one request (large tensors off the loop)."""
        req = await decode()
        if sum(a.nbytes for a in req.inputs.values()) > OFFLOAD_BYTES:
            rows = await asyncio.to_thread(model.check_inputs, req.inputs)
        else:
            rows = model.check_inputs(req.inputs)
        model.check_outputs(req.outputs)
        results = await scope.run(req.inputs, rows)
        if sum(v.nbytes for v in results.values()) > OFFLOAD_BYTES:
            return await asyncio.to_thread(encode, model, req, results)
        return encode(model, req, results)
