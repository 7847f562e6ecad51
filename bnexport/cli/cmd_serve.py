"""``bnexport serve``: a KServe v2 HTTP (and optionally gRPC) server with dynamic batching."""

from __future__ import annotations

import argparse
import os

from bnexport.cli.options import add_backend, add_model, add_precision, verbosity
from bnexport.serve.settings import (
    BATCH_POLICIES,
    INFLIGHT_BODIES,
    LOG_LEVELS,
    MODEL_CONTROL_MODES,
    TOKEN_ENV,
    ServeSettings,
)

#: the server's defaults: every default below is read from here, never spelled again
D = ServeSettings()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand."""
    parser = sub.add_parser(
        "serve",
        help="serve a model (or a model repository) over KServe v2 HTTP",
        description=(
            "Serve MODEL.onnx, or a Triton-style repository REPO_DIR/<model>/<version>/model.onnx, "
            "over the KServe v2 / Open Inference Protocol (HTTP/REST, with Triton's binary "
            "tensor extension: tritonclient.http works unmodified), and with --grpc-port over "
            "gRPC (tritonclient.grpc works unmodified). Concurrent requests are "
            "merged along the batch dimension (dynamic batching). Triton statistics at "
            "/v2/models[/NAME]/stats, repository index at POST /v2/repository/index, "
            "load/unload with --model-control explicit. Prometheus metrics at "
            "/metrics, JSON-lines logs on stderr. SIGTERM drains in-flight requests."
        ),
    )
    add_model(parser, "an .onnx file, or a model repository folder REPO_DIR/<model>/<version>/")
    parser.add_argument("--host", default=D.host, help=f"bind address (default {D.host})")
    parser.add_argument("--port", type=int, default=D.port, help=f"TCP port (default {D.port})")
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=D.grpc_port,
        help="also serve KServe v2 over gRPC (Triton's GRPCInferenceService: tritonclient.grpc "
        "works unmodified) on this port, with the same models, batching, limits and token "
        "(metadata 'authorization: Bearer TOKEN'); default: off",
    )
    parser.add_argument(
        "--model-control",
        choices=MODEL_CONTROL_MODES,
        default=D.model_control,
        help="none: serve the models found at start (default); explicit: also accept "
        "POST /v2/repository/models/NAME/load|unload (and gRPC RepositoryModelLoad/Unload) "
        "to (re)load a model from REPO_DIR or unload it without a restart; requests in "
        "flight finish on the old version",
    )
    add_backend(parser)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=D.device, help=f"default {D.device}"
    )
    add_precision(parser)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=D.max_batch,
        help=f"largest merged batch; 1 disables dynamic batching (default {D.max_batch})",
    )
    parser.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=D.batch_timeout_ms,
        help=f"how long a batch waits for more requests (default {D.batch_timeout_ms:g})",
    )
    parser.add_argument(
        "--batch-policy",
        choices=BATCH_POLICIES,
        default=D.batch_policy,
        help="adaptive: stop waiting as soon as no request is on its way (default); "
        "window: always wait --batch-timeout-ms (Triton's max_queue_delay)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=D.instances,
        help=f"batches of one model run concurrently (default {D.instances})",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=D.intra_op_threads,
        help=f"onnxruntime intra-op threads per run (default {D.intra_op_threads}: the cores "
        "this process may use divided by --instances, at least 1)",
    )
    parser.add_argument(
        "--ort-spinning",
        action="store_true",
        help="let idle onnxruntime threads spin-wait (off: they would starve the HTTP loop)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV, D.token),
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; none). "
        "Prefer the variable: a --token value is visible to other users in the process list; "
        f"the printed example curl reads ${TOKEN_ENV}, never shows the token",
    )
    parser.add_argument(
        "--open-metrics",
        action="store_true",
        help="serve GET /metrics without the token, for Prometheus scraping by pod annotation "
        "(KServe's prometheus.kserve.io/port|path), which sends no credentials; the page holds "
        "counters and latencies, no tensors. Every other path keeps the token",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=D.max_body_mb,
        help=f"request body limit in MiB (default {D.max_body_mb:g})",
    )
    parser.add_argument(
        "--max-inflight-mb",
        type=float,
        default=D.max_inflight_mb,
        help="bound on the request bodies processed at once, in MiB (default "
        f"{INFLIGHT_BODIES}x --max-body-mb; a chunked or compressed body counts as "
        f"--max-body-mb); requests beyond it wait up to {D.admission_wait_s:g} s, then get 503 "
        "with Retry-After. Health/metadata requests are never queued",
    )
    parser.add_argument(
        "--max-inflight-requests",
        type=int,
        default=D.max_inflight_requests,
        help=f"requests with a body processed at once (default {D.max_inflight_requests}); "
        "same wait, then 503",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=D.body_timeout_s,
        help=f"time to receive a whole request body, else 408 (default {D.body_timeout_s:g})",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=D.header_timeout_s,
        help=f"time to receive a request's line and headers, else 408 "
        f"(default {D.header_timeout_s:g})",
    )
    parser.add_argument(
        "--no-memory-arena",
        action="store_true",
        help="disable onnxruntime's CPU memory arena (flat memory, slower large models)",
    )
    parser.add_argument(
        "--no-arena-shrinkage",
        action="store_true",
        help="keep onnxruntime's arena at its peak after merged batches (default: shrink it)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the run on a zero batch of --max-batch rows before serving",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="least severity of the JSON-lines server logs on stderr (one object per line: "
        f"model loads, requests with status and latency, drain); default {D.log_level}, "
        "warning with -q, debug with -v",
    )
    _add_ray_arguments(parser)
    return parser


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--replicas`` and the options that go with it (extra ``bnexport[ray]``)."""
    group = parser.add_argument_group(
        "Ray Serve replicas (extra bnexport[ray])",
        "Run the same server as N Ray Serve replicas behind Ray's HTTP proxy on --port and "
        "its gRPC proxy on --grpc-port; each replica loads the models and batches its own "
        "requests. Without --ray-address a private Ray starts on this machine and stops "
        "with the server (SIGTERM drains the replicas first).",
    )
    group.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="serve with N Ray Serve replicas (with --autoscale: the initial count); "
        "default: one process, no Ray",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of starting "
        "a private local Ray; MODEL must exist at the same path on its nodes",
    )
    group.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs Ray reserves for each replica (0.5: two replicas share a GPU; default 0)",
    )
    group.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="let Ray scale between MIN and MAX replicas on requests in flight per replica "
        "(target: --max-batch)",
    )


def _log_level(args: argparse.Namespace) -> str:
    if args.log_level is not None:
        return args.log_level
    level = verbosity(args)
    return "warning" if level < 0 else "debug" if level > 0 else D.log_level


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The :class:`ServeSettings` the parsed ``serve`` arguments ask for (not yet checked)."""
    return ServeSettings(
        host=args.host,
        port=args.port,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        max_batch=args.max_batch,
        batch_timeout_ms=args.batch_timeout_ms,
        batch_policy=args.batch_policy,
        token=args.token,
        max_body_mb=args.max_body_mb,
        max_inflight_mb=args.max_inflight_mb,
        max_inflight_requests=args.max_inflight_requests,
        body_timeout_s=args.body_timeout_s,
        header_timeout_s=args.header_timeout_s,
        instances=args.instances,
        intra_op_threads=args.intra_op_threads,
        ort_spinning=args.ort_spinning,
        memory_arena=not args.no_memory_arena,
        arena_shrinkage=not args.no_arena_shrinkage,
        log_level=_log_level(args),
        warmup=not args.no_warmup,
        grpc_port=args.grpc_port,
        model_control=args.model_control,
        open_metrics=args.open_metrics,
    )


def run(args: argparse.Namespace) -> int:
    """Validate the arguments and serve until SIGINT/SIGTERM."""
    from bnexport.errors import UsageError
    from bnexport.serve.server import serve_model

    settings = settings_from_args(args)
    bad = settings.problems()
    if bad:
        raise UsageError("invalid argument(s): " + ", ".join(bad))
    ray_flags = (args.ray_address, args.autoscale, args.gpus_per_replica or None)
    if args.replicas is None and any(flag is not None for flag in ray_flags):
        raise UsageError(
            "--ray-address, --gpus-per-replica and --autoscale need --replicas N (Ray Serve)"
        )
    if args.replicas is not None:
        from bnexport.serve.ray import ReplicaOptions, parse_autoscale, serve_replicas

        options = ReplicaOptions(
            replicas=args.replicas,
            ray_address=args.ray_address,
            gpus_per_replica=args.gpus_per_replica,
            autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
        )
        serve_replicas(args.model, settings, options)
    else:
        serve_model(args.model, settings)
    return 0
