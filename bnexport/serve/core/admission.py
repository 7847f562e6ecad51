"""Admission control: a bound on the request bodies the server works on at once.

Every request that carries a body asks for ``cost`` bytes before its body is
read (its ``Content-Length``; the body limit when the size is not known up
front: chunked or compressed bodies). It is admitted when both hold::

    in_flight_bytes + cost <= max_bytes   or   nothing is in flight
    in_flight_requests + 1 <= max_requests

and nobody is waiting ahead of it (first come, first served). Otherwise it waits
in a FIFO queue, at most ``max_wait_s``; a request that still does not fit, or
that finds ``max_waiting`` requests already queued, gets 503 with a
``Retry-After`` header. While a request waits its body stays in the socket
(uvicorn stops reading at 64 KiB), so a queued request holds no memory: the
bound on the memory of request bodies is ``max_bytes``, whatever the burst.
Health, metadata and metrics requests carry no body and are never queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from bnexport.serve.protocol.errors import OverloadedError
from bnexport.serve.settings import ServeSettings

_DEFAULTS = ServeSettings()


@dataclasses.dataclass(eq=False)
class _Waiter:
    cost: int
    future: asyncio.Future


class Admission:
    """FIFO admission of request bodies under a byte and a request-count bound.

    Args:
        max_bytes: bytes of request bodies being processed at once (> 0).
        max_requests: requests with a body being processed at once (> 0).
        max_wait_s: how long a request may wait for room before its 503.
        max_waiting: requests allowed to wait; one more gets 503 at once.
        retry_after_s: value of the ``Retry-After`` header of the 503.
    """

    def __init__(
        self,
        max_bytes: int,
        max_requests: int,
        *,
        max_wait_s: float = _DEFAULTS.admission_wait_s,
        max_waiting: int = 1024,
        retry_after_s: int = 1,
    ) -> None:
        if max_bytes <= 0 or max_requests <= 0 or max_wait_s < 0 or max_waiting < 0:
            raise ValueError(
                "Admission needs max_bytes > 0, max_requests > 0, max_wait_s >= 0, "
                f"max_waiting >= 0. Received: max_bytes={max_bytes}, "
                f"max_requests={max_requests}, max_wait_s={max_wait_s}, "
                f"max_waiting={max_waiting}"
            )
        self.max_bytes = int(max_bytes)
        self.max_requests = int(max_requests)
        self.max_wait_s = float(max_wait_s)
        self.max_waiting = int(max_waiting)
        self.retry_after_s = int(retry_after_s)
        self.bytes = 0  # admitted, not yet released
        self.requests = 0
        self._queue: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests queued for admission."""
        return len(self._queue)

    def _fits(self, cost: int) -> bool:
        if self.requests >= self.max_requests:
            return False
        return self.requests == 0 or self.bytes + cost <= self.max_bytes

    def _take(self, cost: int) -> None:
        self.bytes += cost
        self.requests += 1

    def _release(self, cost: int) -> None:
        self.bytes -= cost
        self.requests -= 1
        self._wake()

    def _wake(self) -> None:
        """Admit waiters from the head of the queue while they fit."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # timed out or cancelled
                self._queue.popleft()
                continue
            if not self._fits(head.cost):
                return
            self._queue.popleft()
            self._take(head.cost)
            head.future.set_result(None)

    def _overloaded(self, why: str) -> OverloadedError:
        return OverloadedError(
            f"server busy: {why} (in flight: {self.requests} requests, {self.bytes} of "
            f"{self.max_bytes} body bytes; bnexport serve --max-inflight-mb / "
            "--max-inflight-requests); retry later",
            self.retry_after_s,
        )

    @contextlib.asynccontextmanager
    async def admit(self, cost: int) -> AsyncIterator[None]:
        """Hold ``cost`` bytes and one request slot for the duration of the block.

        Raises:
            OverloadedError: no room within ``max_wait_s``, or the queue is full.
        """
        cost = max(0, int(cost))
        await self.acquire(cost)
        try:
            yield
        finally:
            self.release(cost)

    def release(self, cost: int) -> None:
        """Give back what :meth:`acquire` took."""
        self._release(max(0, int(cost)))

    async def acquire(self, cost: int) -> None:
        """Take ``cost`` bytes and one request slot, waiting in line if there is no room.

        Raises:
            OverloadedError: no room within ``max_wait_s``, or the queue is full.
        """
        cost = max(0, int(cost))
        if not self._queue and self._fits(cost):
            self._take(cost)
        else:
            if len(self._queue) >= self.max_waiting:
                raise self._overloaded(f"{len(self._queue)} requests already queued")
            waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
            self._queue.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait_s)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release(cost)  # admitted just as the wait ended: give it back
                else:
                    waiter.future.cancel()
                    self._wake()  # a smaller request behind it may fit now
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise self._overloaded(
                    f"no room for {cost} body bytes within {self.max_wait_s:g} s"
                ) from None
