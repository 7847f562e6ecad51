"""Triton's model statistics extension: per model version, counts and durations in ns.

The fields and their meaning are Triton's (``model_statistics`` in
``grpc_service.proto``, ``GET /v2/models/{name}[/versions/{v}]/stats`` over HTTP)::

    last_inference   ms since the epoch of the last request answered (0: none yet)
    inference_count  samples inferred: the batch rows of every successful request
    execution_count  model runs; with dynamic batching <= the number of requests
    inference_stats  {count, ns} per request:
        success         requests answered, request received -> outputs ready
        fail            requests that failed in the model (or its batch was refused)
        queue           time waiting in the dynamic batcher
        compute_input   merging the request into its batch (NumPy concatenate)
        compute_infer   the model run of that batch
        compute_output  splitting the batch's outputs back per request
    batch_stats      per merged batch size: {count, ns} of the three compute phases,
                     counted once per model run (not per request)

As in Triton, each request of a merged batch is charged the whole batch's
compute durations, so ``inference_stats.compute_infer.ns`` can exceed the wall
time under load; ``batch_stats`` counts each run once. Requests refused before
they reach the batcher (malformed body, wrong input shape: a 400 / INVALID_ARGUMENT)
are not counted. ``memory_usage``, ``response_stats`` and the cache fields stay
empty / zero (no response cache, no decoupled models).

:class:`ModelStats` is updated from the batcher's worker threads and read by
the endpoints, so every method takes its lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

#: the six per-request durations of ``inference_stats`` (cache_hit/cache_miss stay empty)
REQUEST_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
#: the three per-run durations of ``batch_stats``
BATCH_FIELDS = ("compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass
class Duration:
    """Triton's ``StatisticDuration``: how many times, and their total in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        """Count ``count`` more occurrences totalling ``ns`` nanoseconds."""
        self.count += count
        self.ns += max(0, int(ns))

    def as_dict(self) -> dict[str, int]:
        """``{"count": ..., "ns": ...}``."""
        return {"count": self.count, "ns": self.ns}


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    """The three compute phases of one model run, in ns, and its size.

    Attributes:
        rows: samples in the merged batch (1 for a request without a batch dimension).
        input_ns: merging the requests' inputs.
        infer_ns: the model run.
        output_ns: splitting the outputs back per request.
    """

    rows: int
    input_ns: int
    infer_ns: int
    output_ns: int


class ModelStats:
    """Statistics of one served model version (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.requests = {field: Duration() for field in REQUEST_FIELDS}
        self.batches: dict[int, dict[str, Duration]] = {}

    def record_execution(self, timing: BatchTiming) -> None:
        """One model run (any outcome): ``execution_count`` and ``batch_stats``."""
        with self._lock:
            self.execution_count += 1
            per = self.batches.setdefault(timing.rows, {f: Duration() for f in BATCH_FIELDS})
            per["compute_input"].add(timing.input_ns)
            per["compute_infer"].add(timing.infer_ns)
            per["compute_output"].add(timing.output_ns)

    def record_success(
        self, rows: int, total_ns: int, queue_ns: int, timing: BatchTiming | None
    ) -> None:
        """One request answered: ``rows`` samples, ``total_ns`` since it was received.

        Args:
            rows: its batch rows (1 when the model has no batch dimension).
            total_ns: request received -> outputs ready.
            queue_ns: time spent waiting in the batcher.
            timing: the run that answered it (``None``: not known).
        """
        with self._lock:
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.inference_count += rows
            r = self.requests
            r["success"].add(total_ns)
            r["queue"].add(queue_ns)
            if timing is not None:
                r["compute_input"].add(timing.input_ns)
                r["compute_infer"].add(timing.infer_ns)
                r["compute_output"].add(timing.output_ns)

    def record_failure(self, total_ns: int) -> None:
        """One request that the model (or the batcher) failed."""
        with self._lock:
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.requests["fail"].add(total_ns)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` as JSON (the HTTP body, and the gRPC message's fields)."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    **{f: d.as_dict() for f, d in self.requests.items()},
                    "cache_hit": Duration().as_dict(),
                    "cache_miss": Duration().as_dict(),
                },
                "batch_stats": [
                    {"batch_size": size, **{f: d.as_dict() for f, d in per.items()}}
                    for size, per in sorted(self.batches.items())
                ],
                "memory_usage": [],
            }


def statistics_response(repository: Any, name: str | None, version: str | None) -> dict[str, Any]:
    """Triton's ``ModelStatisticsResponse`` as JSON: ``{"model_stats": [...]}``.

    Args:
        repository: the :class:`~bnexport.serve.core.repository.ModelRepository`.
        name: one model, or ``None``/empty for every model.
        version: one version of ``name``, or ``None``/empty for all of its versions.

    Raises:
        ModelNotFoundError: unknown model or version.
    """
    if not name:
        models = repository.all()
    elif version:
        models = [repository.get(name, version)]
    else:
        models = [repository.get(name, v) for v in repository.versions(name)]
    return {"model_stats": [m.stats.as_dict(m.name, m.version) for m in models]}
