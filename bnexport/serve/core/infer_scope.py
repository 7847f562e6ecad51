"""One inference request's lifecycle, shared by the HTTP and gRPC front ends.

    look up the model -> count it in flight -> tell its batcher to expect a request
    -> (the caller decodes and validates) -> submit -> (the caller encodes)
    -> on exit: un-expect if never submitted, in-flight -1, request counter and latency

The status recorded is 200 when the caller marks success, the ``ServeError``'s status
when one ends the request, 499 when it is cancelled (client gone, server stopping) and
500 otherwise. Latency is measured from arrival (``received_ns``), the same clock the
Triton statistics use.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import numpy as np

from bnexport.errors import InputError
from bnexport.serve.core.logs import get_logger
from bnexport.serve.protocol.errors import BadRequestError, ModelRunError, ServeError


class InferScope:
    """Bookkeeping of one inference request (use as ``with InferScope(state) as scope``).

    Attributes:
        model: the ``ServedModel`` once :meth:`open` found it.
        batcher: its batcher, told to expect this request.
        received_ns: ``time.perf_counter_ns()`` at arrival.
    """

    def __init__(self, state: Any) -> None:
        self._state = state
        self.received_ns = time.perf_counter_ns()
        self.model: Any = None
        self.batcher: Any = None
        self._labels = ("unknown", "")
        self._inflight: Any = None
        self._expected: Any = None
        self._ok = False

    def __enter__(self) -> InferScope:
        return self

    def open(self, name: str, version: str | None) -> Any:
        """Find the model and announce the request to its batcher; returns the model.

        No ``await`` between the lookup and ``expect()``: a model being unloaded either
        serves this request or is already gone.

        Raises:
            ServeError: unknown model or version.
        """
        model = self._state.repository.get(name, version)
        self.model = model
        self._labels = (model.name, model.version)
        self._inflight = self._state.metrics.inflight.labels(*self._labels)
        self._inflight.inc()
        self.batcher = self._state.batcher(model)
        self.batcher.expect()
        self._expected = self.batcher
        return model

    async def run(self, inputs: dict[str, np.ndarray], rows: int | None) -> dict[str, np.ndarray]:
        """Submit the validated feed through the batcher; the model's outputs.

        Raises:
            BadRequestError: the model refused the tensors (400 / INVALID_ARGUMENT).
            ModelRunError: the model failed (500 / INTERNAL; logged once with its traceback).
        """
        self._expected = None
        model = self.model
        try:
            return await self.batcher.submit(
                inputs, rows, expected=True, received_ns=self.received_ns
            )
        except ServeError:
            raise
        except InputError as exc:
            raise BadRequestError(f"model '{model.name}': {exc}") from None
        except Exception as exc:
            get_logger().error(
                "model run failed",
                exc_info=exc,
                extra={"fields": {"model": model.name, "version": model.version}},
            )
            raise ModelRunError(
                f"model '{model.name}' version {model.version} failed on this request: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def succeeded(self) -> None:
        """Mark the request answered (status 200)."""
        self._ok = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, ServeError):
            status = exc.status_code
        elif exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            status = 499
        elif exc_type is None and self._ok:
            status = 200
        else:
            status = 500
        if self._expected is not None:
            self._expected.unexpect()
        if self._inflight is not None:
            self._inflight.dec()
        metrics = self._state.metrics
        metrics.requests.labels(*self._labels, str(status)).inc()
        if self.model is not None:
            elapsed = (time.perf_counter_ns() - self.received_ns) / 1e9
            metrics.latency.labels(*self._labels).observe(elapsed)
