"""The server's settings: one object, and the one home of every default.

The CLI (``bnexport serve``) fills one :class:`ServeSettings`; the one-process server
(``serve_model(path, settings)``), every Ray Serve replica (:mod:`bnexport.serve.ray`)
and the KServe/Triton writers read it or its field defaults, so a flag means the same
thing, with the same default, on every path.

This module is a leaf: it imports nothing from bnexport (the server, the app and the
CLI import it), so a default read here never pulls FastAPI, onnxruntime or Ray in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: environment variable holding the bearer token (``--token``'s default; the printed
#: ``curl`` example and the KServe manifests read it from there)
TOKEN_ENV = "BNEXPORT_SERVE_TOKEN"
#: with ``max_inflight_mb`` unset, the in-flight bound is this many bodies of ``max_body_mb``
INFLIGHT_BODIES = 4
BATCH_POLICIES = ("adaptive", "window")
MODEL_CONTROL_MODES = ("none", "explicit")
LOG_LEVELS = ("debug", "info", "warning", "error")
_MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """What ``bnexport serve`` was asked for; each field's default is the server's default.

    With Ray Serve replicas, ``host``/``port``/``grpc_port`` are the addresses of Ray's
    HTTP and gRPC proxies, and ``header_timeout_s`` is not applied (Ray's proxy reads
    the request headers, see :mod:`bnexport.serve.ray.driver`).

    Attributes:
        host: bind address (loopback by default; anything else should use ``token``).
        port: HTTP port (0: a free port).
        backend: ``Session`` backend (``auto``, ``onnxruntime``, ``tensorrt``).
        device: ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``fp16``.
        max_batch: largest dynamically merged batch; 1 disables merging. Also the
            ``max_batch_size`` a Triton repository gets by default.
        batch_timeout_ms: how long a batch waits for more requests.
        batch_policy: ``"adaptive"`` (stop waiting when no request is on its way) or
            ``"window"`` (always wait ``batch_timeout_ms``); see
            :mod:`bnexport.serve.core.batcher`.
        token: bearer token required on every path but ``/v2/health/*`` (and on gRPC).
        max_body_mb: request body (and gRPC message) limit in MiB (413 above it).
        instances: batches of one model that may run concurrently.
        intra_op_threads: onnxruntime intra-op threads per run (0: the cores this process
            may use divided by ``instances``, at least 1; see
            :func:`bnexport.serve.core.session_options.threads_per_run`).
        ort_spinning: let onnxruntime's idle worker threads spin-wait. Off by default:
            spinning threads take the CPU the event loop needs to parse requests.
        memory_arena: onnxruntime's CPU memory arena. With dynamic batching every batch
            size is a new shape, and the arena grows in steps until it covers them. Off:
            runs allocate afresh (slower for large models).
        arena_shrinkage: with the arena on, shrink it after every run of a model whose
            requests are merged (onnxruntime's run config entry
            ``memory.enable_memory_arena_shrinkage``, see
            :func:`bnexport.serve.core.session_options.ort_run_options`): memory stays
            bounded by one batch while the arena still serves the allocations within a
            run. Off: the arena keeps what it grew to.
        log_level: ``debug``, ``info``, ``warning`` or ``error`` (JSON-lines logs on stderr).
        graceful_timeout_s: on SIGTERM, how long in-flight requests may take.
        max_inflight_mb: MiB of request bodies processed at once (``None``:
            :data:`INFLIGHT_BODIES` bodies of ``max_body_mb``); requests beyond it wait up
            to ``admission_wait_s``, then get 503 with ``Retry-After`` (see
            :mod:`bnexport.serve.core.admission`).
        max_inflight_requests: requests with a body processed at once (same rule).
        admission_wait_s: how long a request may wait for room under the in-flight
            bounds before its 503.
        body_timeout_s: time to receive a whole request body, else 408; also the
            deadline of an infer request from arrival to answer (HTTP 408, and gRPC
            DEADLINE_EXCEEDED for a call that carries no deadline of its own), so a
            request stuck in a model gives its in-flight slot back. ``None``: no limit.
        header_timeout_s: time to receive a request's line and headers, else 408
            (see :mod:`bnexport.serve.rest.http11`).
        keep_alive_s: idle time before a keep-alive connection is closed.
        warmup: run each model on zero batches before serving, ``max_batch`` rows halved
            down to 1, each twice (see
            :meth:`bnexport.serve.core.repository.ServedModel.warmup`).
        grpc_port: also serve KServe v2 over gRPC on this port (same models, batcher,
            limits, token, logs and metrics; see :mod:`bnexport.serve.grpc.service`);
            ``None``: HTTP only.
        model_control: ``"none"`` or ``"explicit"`` (load/unload over HTTP and gRPC; see
            :mod:`bnexport.serve.core.model_control`).
        open_metrics: serve ``GET /metrics`` without ``token`` (for Prometheus scraping by
            pod annotation, e.g. KServe's ``prometheus.kserve.io/*``); other paths keep it.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    max_batch: int = 32
    batch_timeout_ms: float = 2.0
    batch_policy: str = "adaptive"
    token: str | None = None
    max_body_mb: float = 64.0
    instances: int = 1
    intra_op_threads: int = 0
    ort_spinning: bool = False
    memory_arena: bool = True
    arena_shrinkage: bool = True
    log_level: str = "info"
    graceful_timeout_s: float = 30.0
    max_inflight_mb: float | None = None
    max_inflight_requests: int = 256
    admission_wait_s: float = 10.0
    body_timeout_s: float | None = 60.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    warmup: bool = True
    grpc_port: int | None = None
    model_control: str = "none"
    open_metrics: bool = False

    def replace(self, **changes: Any) -> ServeSettings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def max_body_bytes(self) -> int:
        """The request body (and gRPC message) limit in bytes."""
        return int(self.max_body_mb * _MIB)

    @property
    def max_inflight_bytes(self) -> int:
        """The bound on request-body bytes processed at once."""
        if self.max_inflight_mb is None:
            return INFLIGHT_BODIES * self.max_body_bytes
        return int(self.max_inflight_mb * _MIB)

    def problems(self) -> list[str]:
        """What is wrong with these settings, one ``--flag=value (rule)`` each (CLI spelling)."""
        bad = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                bad.append(f"--{name.replace('_', '-')}={getattr(self, name)!r} ({rule})")

        need(0 <= self.port <= 65535, "port", "0..65535")
        if self.grpc_port is not None:
            need(0 <= self.grpc_port <= 65535, "grpc_port", "0..65535")
            need(
                self.grpc_port != self.port or self.port == 0,
                "grpc_port",
                "must differ from --port",
            )
        need(self.max_batch >= 1, "max_batch", ">= 1")
        need(self.batch_timeout_ms >= 0, "batch_timeout_ms", ">= 0")
        need(self.batch_policy in BATCH_POLICIES, "batch_policy", " or ".join(BATCH_POLICIES))
        need(self.intra_op_threads >= 0, "intra_op_threads", ">= 0")
        need(self.instances >= 1, "instances", ">= 1")
        need(self.max_body_mb > 0, "max_body_mb", "> 0")
        if self.max_inflight_mb is not None:
            need(self.max_inflight_mb > 0, "max_inflight_mb", "> 0")
        need(self.max_inflight_requests >= 1, "max_inflight_requests", ">= 1")
        need(self.admission_wait_s >= 0, "admission_wait_s", ">= 0")
        if self.body_timeout_s is not None:
            need(self.body_timeout_s > 0, "body_timeout_s", "> 0")
        need(self.header_timeout_s > 0, "header_timeout_s", "> 0")
        need(self.keep_alive_s > 0, "keep_alive_s", "> 0")
        need(self.graceful_timeout_s >= 0, "graceful_timeout_s", ">= 0")
        need(self.log_level in LOG_LEVELS, "log_level", ", ".join(LOG_LEVELS))
        need(
            self.model_control in MODEL_CONTROL_MODES,
            "model_control",
            " or ".join(MODEL_CONTROL_MODES),
        )
        return bad
