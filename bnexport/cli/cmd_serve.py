"""``bnexport serve``: a KServe v2 HTTP (and optionally gRPC) server with dynamic batching."""

from __future__ import annotations

import argparse
import os


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
    parser.add_argument("model", metavar="MODEL.onnx|REPO_DIR", help="model file or repository")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve KServe v2 over gRPC (Triton's GRPCInferenceService: tritonclient.grpc "
        "works unmodified) on this port, with the same models, batching, limits and token "
        "(metadata 'authorization: Bearer TOKEN'); default: off",
    )
    parser.add_argument(
        "--model-control",
        choices=("none", "explicit"),
        default="none",
        help="none: serve the models found at start (default); explicit: also accept "
        "POST /v2/repository/models/NAME/load|unload (and gRPC RepositoryModelLoad/Unload) "
        "to (re)load a model from REPO_DIR or unload it without a restart; requests in "
        "flight finish on the old version",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="runtime backend (default auto)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="largest merged batch; 1 disables dynamic batching (default 32)",
    )
    parser.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=2.0,
        help="how long a batch waits for more requests (default 2)",
    )
    parser.add_argument(
        "--batch-policy",
        choices=("adaptive", "window"),
        default="adaptive",
        help="adaptive: stop waiting as soon as no request is on its way (default); "
        "window: always wait --batch-timeout-ms (Triton's max_queue_delay)",
    )
    parser.add_argument(
        "--instances", type=int, default=1, help="batches of one model run concurrently"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads per model (default 0: onnxruntime's choice)",
    )
    parser.add_argument(
        "--ort-spinning",
        action="store_true",
        help="let idle onnxruntime threads spin-wait (off: they would starve the HTTP loop)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("BNEXPORT_SERVE_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $BNEXPORT_SERVE_TOKEN; none). "
        "Prefer the variable: a --token value is visible to other users in the process list; "
        "the printed example curl reads $BNEXPORT_SERVE_TOKEN, never shows the token",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=64.0, help="request body limit in MiB (default 64)"
    )
    parser.add_argument(
        "--max-inflight-mb",
        type=float,
        default=None,
        help="bound on the request bodies processed at once, in MiB (default 4x --max-body-mb; "
        "a chunked or compressed body counts as --max-body-mb); requests beyond it wait up "
        "to 10 s, then get 503 with Retry-After. Health/metadata requests are never queued",
    )
    parser.add_argument(
        "--max-inflight-requests",
        type=int,
        default=256,
        help="requests with a body processed at once (default 256); same wait, then 503",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=60.0,
        help="time to receive a whole request body, else 408 (default 60)",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        help="time to receive a request's line and headers, else 408 (default 10)",
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
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Validate the arguments and serve until SIGINT/SIGTERM."""
    from bnexport.errors import UsageError
    from bnexport.serve.server import serve_model

    bad = []
    if not 0 <= args.port <= 65535:
        bad.append(f"--port={args.port} (0..65535)")
    if args.grpc_port is not None and not 0 <= args.grpc_port <= 65535:
        bad.append(f"--grpc-port={args.grpc_port} (0..65535)")
    if args.grpc_port is not None and args.grpc_port == args.port != 0:
        bad.append(f"--grpc-port={args.grpc_port} (must differ from --port)")
    if args.max_batch < 1:
        bad.append(f"--max-batch={args.max_batch} (>= 1)")
    if args.batch_timeout_ms < 0:
        bad.append(f"--batch-timeout-ms={args.batch_timeout_ms} (>= 0)")
    if args.intra_op_threads < 0:
        bad.append(f"--intra-op-threads={args.intra_op_threads} (>= 0)")
    if args.instances < 1:
        bad.append(f"--instances={args.instances} (>= 1)")
    if args.max_body_mb <= 0:
        bad.append(f"--max-body-mb={args.max_body_mb} (> 0)")
    if args.max_inflight_mb is not None and args.max_inflight_mb <= 0:
        bad.append(f"--max-inflight-mb={args.max_inflight_mb} (> 0)")
    if args.max_inflight_requests < 1:
        bad.append(f"--max-inflight-requests={args.max_inflight_requests} (>= 1)")
    if args.body_timeout_s <= 0:
        bad.append(f"--body-timeout-s={args.body_timeout_s} (> 0)")
    if args.header_timeout_s <= 0:
        bad.append(f"--header-timeout-s={args.header_timeout_s} (> 0)")
    if bad:
        raise UsageError("invalid argument(s): " + ", ".join(bad))
    serve_model(
        args.model,
        args.host,
        args.port,
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
        log_level=args.log_level,
        warmup=not args.no_warmup,
        grpc_port=args.grpc_port,
        model_control=args.model_control,
    )
    return 0
