"""Prometheus metrics of the server, exposed at ``GET /metrics``.

Every app gets its own ``CollectorRegistry`` (several servers in one process,
as in the tests, do not share counters). Metrics:

- ``bnexport_requests_total{model, version, status}``: inference requests by
  HTTP status (``model="unknown"`` when the name matched no model, so arbitrary
  names cannot blow up the label set);
- ``bnexport_request_latency_seconds{model, version}``: infer request latency, from the
  body being read to the response being built;
- ``bnexport_batch_size{model, version}``: rows per model run (histogram; its ``_count``
  is the number of model runs);
- ``bnexport_batch_requests{model, version}``: requests merged into one run;
- ``bnexport_run_latency_seconds{model, version}``: time of one model run;
- ``bnexport_queue_depth{model, version}``: requests waiting for the batcher;
- ``bnexport_inflight_requests{model, version}``: infer requests being handled;
- ``bnexport_grpc_requests_total{rpc, code}``: gRPC calls by method and status code
  (an infer call is also in ``bnexport_requests_total``, with the HTTP status its
  gRPC code stands for, so the two protocols add up there).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's metric objects, registered in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bnexport_requests",
            "Inference requests by model and HTTP status.",
            ["model", "version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "bnexport_request_latency_seconds",
            "Inference request latency (body read to response built).",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bnexport_batch_size",
            "Rows per model run after dynamic batching.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "bnexport_batch_requests",
            "Requests merged into one model run.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.run_latency = Histogram(
            "bnexport_run_latency_seconds",
            "Duration of one model run.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bnexport_queue_depth",
            "Requests waiting in the dynamic batcher.",
            ["model", "version"],
            registry=r,
        )

        self.inflight = Gauge(
            "bnexport_inflight_requests",
            "Inference requests being handled (body read to response built).",
            ["model", "version"],
            registry=r,
        )
        self.grpc_requests = Counter(
            "bnexport_grpc_requests",
            "gRPC calls by method and status code.",
            ["rpc", "code"],
            registry=r,
        )

    def batch_hook(self, model: str, version: str):
        """``on_batch`` callback for the batcher of ``model`` at ``version``."""
        size = self.batch_size.labels(model, version)
        reqs = self.batch_requests.labels(model, version)
        run = self.run_latency.labels(model, version)

        def on_batch(rows: int, n_requests: int, seconds: float) -> None:
            size.observe(rows)
            reqs.observe(n_requests)
            run.observe(seconds)

        return on_batch

    def queue_hook(self, model: str, version: str):
        """``on_queue`` callback for the batcher of ``model`` at ``version``."""
        return self.queue_depth.labels(model, version).set

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
