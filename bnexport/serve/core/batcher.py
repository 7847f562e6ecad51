"""Dynamic batching: merge concurrent requests for one model into one run.

Per served model, requests wait in an ``asyncio.Queue``. A worker takes the
first one, then keeps taking requests with the same *signature* (input names,
dtypes and every dimension but the first) until the merged batch holds
``max_batch`` rows or ``timeout`` has passed since the first was taken. The
batch is concatenated along axis 0::

    X = concat([x_1, ..., x_k], axis=0)        # x_i: [n_i, ...], X: [sum n_i, ...]
    Y = model(X)                               # one run, in a worker thread
    y_i = Y[o_i : o_i + n_i]                   # o_i = n_1 + ... + n_{i-1}

At inference every sample is computed independently (BN uses its moving
statistics), so ``y_i`` equals ``model(x_i)``: the tests check it. A request
that does not fit (other signature, or too many rows) starts the next batch;
one larger than ``max_batch`` runs alone (the Session splits it if it must).

While a batch runs in the thread pool the queue fills, so the next batch forms
without waiting: under load batches grow by themselves. How long a batch waits
for more requests is the *policy*:

- ``"window"`` (Triton's ``max_queue_delay``): until ``max_batch`` rows or
  ``timeout`` after the first request, whatever else happens.
- ``"adaptive"`` (the server's default): as ``"window"``, but the wait also ends
  as soon as the queue is empty and no request for the model is still being
  received (``expect()`` was called for it, ``submit`` not yet). With a fixed
  population of clients all waiting on the batch being formed, the window would
  only add idle time (and on a loaded machine a timer wake-up takes far longer
  than the window).

If a merged run raises, each request of the batch is run again on its own so
that only the request that makes the model fail gets the error. ``close()``
waits (bounded) for the requests announced with ``expect()`` to be submitted,
stops taking requests, runs everything already queued and waits for the
workers: in-flight requests complete. The same ``close()`` retires the batcher
of a model version that is being unloaded or replaced.

With a :class:`~bnexport.serve.core.statistics.ModelStats`, every run and every
request is recorded in Triton's statistics (queue time per request; merge, run
and split time per batch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bnexport.serve.core.statistics import BatchTiming, ModelStats
from bnexport.serve.protocol.errors import UnavailableError

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
#: ``on_batch(rows, requests, seconds)`` after every model run
BatchHook = Callable[[int, int, float], None]


@dataclasses.dataclass(eq=False)
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int | None
    signature: tuple
    future: asyncio.Future
    received_ns: int  # request received (perf_counter_ns), for the success duration
    queued_ns: int  # submitted to the batcher
    started_ns: int = 0  # its batch started (queue time = started_ns - queued_ns)
    timing: BatchTiming | None = None  # the run that answered it


_STOP = object()  # ends one worker (queued after everything still to run)
_WAKE = object()  # ends the wait for more requests (see ``flush``)


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple:
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(inputs.items()))


#: batches with more input bytes than this never run on the event loop (see ``inline_below_s``)
INLINE_MAX_BYTES = 1 << 20


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into batched runs of ``run_fn``.

    Args:
        run_fn: runs the model on a feed (``Session.run``); called in worker threads.
        max_batch: most rows in a merged batch; ``<= 1`` runs every request alone.
        timeout_s: wait for more requests after the first one of a batch.
        workers: batches that may run at the same time (model instances); each run should
            then use ``cores // workers`` intra-op threads (see
            :func:`~bnexport.serve.core.session_options.threads_per_run`).
        on_batch: metrics hook, called after each run.
        on_queue: metrics hook, called with the queue depth when it changes.
        policy: ``"window"`` or ``"adaptive"`` (see the module docstring).
        inline_below_s: with one worker, run batches on the event loop itself once the
            moving average of the run time is below this (0: never). For models that
            take microseconds the two thread switches of a pool run cost more than the
            run, and on a loaded machine each switch may wait for a time slice.
        stats: Triton statistics of the model version, updated per run and per request.
    """

    def __init__(
        self,
        run_fn: RunFn,
        *,
        max_batch: int,
        timeout_s: float,
        workers: int = 1,
        on_batch: BatchHook | None = None,
        on_queue: Callable[[int], None] | None = None,
        policy: str = "window",
        inline_below_s: float = 0.0,
        stats: ModelStats | None = None,
    ) -> None:
        if policy not in ("window", "adaptive"):
            raise ValueError(f"policy must be 'window' or 'adaptive'. Received: {policy!r}")
        self.policy = policy
        self._arriving = 0  # expect() called, submit() not yet
        self._collecting = 0  # workers waiting for more requests
        self._run_fn = run_fn
        self._workers = workers
        self.inline_below_s = inline_below_s
        self._mean_run_s = float("inf")
        self._runs = 0
        self.max_batch = max(1, int(max_batch))
        self.timeout_s = max(0.0, float(timeout_s))
        self._queue: asyncio.Queue = asyncio.Queue()
        self._carry: list[_Item] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnexport-run")
        self._on_batch = on_batch
        self._on_queue = on_queue
        self.stats = stats
        self._settled = asyncio.Event()  # set whenever no expected request is still arriving
        self._settled.set()
        self._closing = False
        self._waiting = 0  # submitted, not yet taken into a batch
        self._tasks = [
            asyncio.get_running_loop().create_task(self._worker()) for _ in range(workers)
        ]

    @property
    def depth(self) -> int:
        """Requests waiting to run (not counting a batch that is running)."""
        return self._waiting

    def _report_depth(self) -> None:
        if self._on_queue is not None:
            self._on_queue(self.depth)

    @property
    def closing(self) -> bool:
        """``close()`` has begun: new requests are refused."""
        return self._closing

    def expect(self) -> None:
        """A request for this model is being received; ``submit`` or ``unexpect`` follows."""
        self._arriving += 1
        self._settled.clear()

    def _arrived(self) -> None:
        self._arriving -= 1
        if self._arriving <= 0:
            self._settled.set()

    def unexpect(self) -> None:
        """An expected request will not be submitted (it failed before)."""
        self._arrived()
        if self.policy == "adaptive" and self._arriving == 0 and self._collecting:
            self._queue.put_nowait(_WAKE)  # nothing more is coming: stop waiting

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int | None,
        *,
        expected: bool = False,
        received_ns: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue one request and return its outputs once its batch has run.

        Args:
            inputs: validated feed of one request.
            rows: its batch size (first dimension), ``None`` if it has none.
            expected: ``expect()`` was called for this request.
            received_ns: ``time.perf_counter_ns()`` when the request arrived (the start of
                its ``success`` duration in the statistics); ``None``: now.

        Raises:
            UnavailableError: the batcher is closing.
            Exception: whatever ``run_fn`` raised for this request.
        """
        if expected:
            self._arrived()
        if self._closing:
            raise UnavailableError("server is shutting down")
        fut = asyncio.get_running_loop().create_future()
        now = time.perf_counter_ns()
        item = _Item(inputs, rows, _signature(inputs), fut, received_ns or now, now)
        self._queue.put_nowait(item)
        self._waiting += 1
        self._report_depth()
        return await fut

    def flush(self) -> None:
        """Stop waiting for more requests: batches run as soon as they are taken.

        Called when shutdown begins, so queued requests are answered without
        waiting for the batching window.
        """
        self.timeout_s = 0.0
        for _ in self._tasks:
            self._queue.put_nowait(_WAKE)

    async def close(self, arrival_timeout_s: float = 30.0) -> None:
        """Refuse new requests, run those queued, stop the workers.

        Requests announced with ``expect()`` (their bodies being read or decoded)
        are waited for first, at most ``arrival_timeout_s``, so that they are run
        rather than refused.
        """
        if self._closing:
            return
        if self._arriving > 0:
            try:
                await asyncio.wait_for(self._settled.wait(), arrival_timeout_s)
            except TimeoutError:
                pass
        if self._closing:  # a concurrent close() got there first
            return
        self._closing = True
        for _ in self._tasks:
            self._queue.put_nowait(_STOP)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _next(self, timeout: float | None) -> Any:
        """Next item (carry first), waiting at most ``timeout`` (``None``: forever)."""
        if self._carry:
            return self._carry.pop(0)
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0 or (self.policy == "adaptive" and self._arriving == 0):
                raise TimeoutError from None
        self._collecting += 1
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        finally:
            self._collecting -= 1

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._next(None)
            if first is _STOP:
                break
            if first is _WAKE:
                continue
            batch, rows = [first], first.rows or 0
            mergeable = first.rows is not None and self.max_batch > 1
            deadline = loop.time() + self.timeout_s
            while mergeable and rows < self.max_batch:
                try:
                    item = await self._next(deadline - loop.time())
                except TimeoutError:
                    break
                if item is _STOP:
                    stop = True
                    break
                if item is _WAKE:
                    break
                if item.signature != first.signature or rows + (item.rows or 0) > self.max_batch:
                    self._carry.append(item)
                    break
                batch.append(item)
                rows += item.rows
            await self._run(batch, loop)

    async def _run(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        self._waiting -= len(batch)
        self._report_depth()
        live = [it for it in batch if not it.future.done()]  # skip cancelled clients
        if not live:
            return
        started = time.perf_counter_ns()
        for it in live:
            it.started_ns = started
        # a model that runs faster than a thread handoff runs on the event loop itself, unless
        # the batch is large (its run, however fast per row, would stall /v2/health/*)
        inline = (
            self._workers == 1
            and self._mean_run_s < self.inline_below_s
            and sum(a.nbytes for it in live for a in it.inputs.values()) <= INLINE_MAX_BYTES
        )
        try:
            if inline:
                results = self._run_merged(live)
            else:
                results = await loop.run_in_executor(self._executor, self._run_merged, live)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request(s)
            if len(live) == 1:
                results = [exc]
            elif inline:
                results = self._run_each(live)
            else:
                results = await loop.run_in_executor(self._executor, self._run_each, live)
        done = time.perf_counter_ns()
        for item, res in zip(live, results, strict=True):
            if item.future.done():
                continue
            if isinstance(res, BaseException):
                item.future.set_exception(res)
                if self.stats is not None:
                    self.stats.record_failure(done - item.received_ns)
            else:
                item.future.set_result(res)
                if self.stats is not None:
                    self.stats.record_success(
                        item.rows or 1,
                        done - item.received_ns,
                        item.started_ns - item.queued_ns,
                        item.timing,
                    )

    def _timed_run(
        self, feed: dict[str, np.ndarray], rows: int, n_requests: int
    ) -> tuple[dict, int]:
        """Run the model; return its outputs and the run time in ns (recorded in the hooks).

        A run that raises still counts as an execution in the statistics.
        """
        start = time.perf_counter()
        failed = True
        try:
            out = self._run_fn(feed)
            failed = False
            return out, int((time.perf_counter() - start) * 1e9)
        finally:
            seconds = time.perf_counter() - start
            if failed and self.stats is not None:
                self.stats.record_execution(BatchTiming(rows, 0, int(seconds * 1e9), 0))
            # moving average of the run time; the first runs (warm-up) go to the thread pool
            self._runs += 1
            if self._runs > 3:
                prev = self._mean_run_s if self._mean_run_s != float("inf") else seconds
                self._mean_run_s = 0.8 * prev + 0.2 * seconds
            if self._on_batch is not None:
                self._on_batch(rows, n_requests, seconds)

    def _record(self, items: list[_Item], rows: int, input_ns: int, infer_ns: int, t0: int) -> None:
        """Attach the run's timing to its requests and count the execution."""
        timing = BatchTiming(rows, input_ns, infer_ns, time.perf_counter_ns() - t0)
        for it in items:
            it.timing = timing
        if self.stats is not None:
            self.stats.record_execution(timing)

    def _run_merged(self, batch: list[_Item]) -> list[dict[str, np.ndarray]]:
        """One run for the whole batch, split back per request (worker thread)."""
        if len(batch) == 1:
            out, infer_ns = self._timed_run(batch[0].inputs, batch[0].rows or 1, 1)
            self._record(batch, batch[0].rows or 1, 0, infer_ns, time.perf_counter_ns())
            return [out]
        t0 = time.perf_counter_ns()
        sizes = [it.rows for it in batch]
        total = sum(sizes)
        feed = {
            name: np.concatenate([it.inputs[name] for it in batch], axis=0)
            for name in batch[0].inputs
        }
        input_ns = time.perf_counter_ns() - t0
        out, infer_ns = self._timed_run(feed, total, len(batch))
        t1 = time.perf_counter_ns()
        for name, arr in out.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                if self.stats is not None:
                    self.stats.record_execution(BatchTiming(total, input_ns, infer_ns, 0))
                raise RuntimeError(
                    f"output '{name}' has shape {arr.shape}, not a batch of {total}; "
                    "the model cannot be batched"
                )
        offsets = np.cumsum([0, *sizes])
        split = [
            {name: arr[offsets[i] : offsets[i + 1]] for name, arr in out.items()}
            for i in range(len(batch))
        ]
        self._record(batch, total, input_ns, infer_ns, t1)
        return split

    def _run_each(self, batch: list[_Item]) -> list[Any]:
        """Run every request alone; an exception becomes that request's result."""
        results: list[Any] = []
        for it in batch:
            try:
                out, infer_ns = self._timed_run(it.inputs, it.rows or 1, 1)
            except Exception as exc:  # noqa: BLE001 - delivered to the request's future
                results.append(exc)
                continue
            self._record([it], it.rows or 1, 0, infer_ns, time.perf_counter_ns())
            results.append(out)
        return results
