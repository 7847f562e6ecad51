"""Load-test ``bnexport serve`` on loopback, with and without dynamic batching.

For each model the server is started as a subprocess (``python -m bnexport serve
MODEL --max-batch B`` on 127.0.0.1) and driven by a bounded load generator:
``--concurrency`` clients (``tritonclient.http.aio``, binary tensors) share a
fixed number of requests and stop when it is reached. Every answer is checked
against onnxruntime run in this process on the same input (a wrong answer
counts as an error). Reported per run: throughput, p50/p99 latency, errors,
model runs and mean merged batch (from ``/metrics``), and the server's RSS after
warm-up and at the end.

Models:

- ``digits``: the quickstart model (``bnexport-out/digits.onnx``) when it exists,
  else a digits-like CNN built with onnx.helper (8x8x1 -> Conv+BN+ReLU -> Dense).
- ``resnet50``: ``keras.applications.ResNet50(weights=None)`` exported with
  ``bnexport.export`` (BN folded) in a subprocess, cached in ``benchmarks/.cache/``.

The digits model is also timed sequentially (one client) against an in-process
``Session.run`` of the same input: the difference of medians is the server's
per-request overhead (HTTP, JSON header, binary tensors, batcher handoff).

Section ``ray`` (see ``serve_ray.py``): the digits model served by one process, by
``--replicas 1`` and by ``--replicas 2`` (Ray Serve), one after the other: time to
ready, RSS of all processes, req/s, p50, p99 at 1 and ``--concurrency`` clients.

Section ``peers`` (see ``serve_peer.py``): bnexport over HTTP (binary and JSON
tensors) and gRPC against MLServer 1.7.1 (HTTP JSON and gRPC) serving the same
ONNX through ``benchmarks/mlserver_runtime/`` with adaptive batching, at 1 and
32 concurrent clients, in interleaved rounds; req/s, p50, p99, and the
per-request overhead over ``Session.run`` of every c=1 row; ``--peer-variant
NAME=ARGS`` adds a bnexport server with other settings to the same rounds. The CPU's
features and the load average are printed beside the figures. MLServer runs from
``--peer-venv``; without it its rows are skipped with a message.

Targets (issue 7): >= 3x throughput from batching at 32 clients on ResNet50,
0 errors over 10,000 digits requests, RSS growth < 5 % after warm-up, overhead
<= 1 ms per request on digits.

Example::

    python benchmarks/serve_bench.py --digits-requests 10000 --resnet-requests 320 \\
        --json benchmarks/results/serve.json
    python benchmarks/serve_bench.py --sections peers --peer-venv /tmp/mlserver-venv \\
        --json benchmarks/results/serve_peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVER_ARGS: list[str] = []  # extra `bnexport serve` arguments (--server-args)
CACHE = Path(__file__).resolve().parent / ".cache"


# -- models -----------------------------------------------------------------------------------
def build_digits_cnn(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f = np.float32
    p = {
        "conv_w": rng.standard_normal((16, 1, 3, 3)).astype(f) * f(0.5),
        "conv_b": np.zeros(16, f),
        "gamma": rng.uniform(0.5, 1.5, 16).astype(f),
        "beta": rng.standard_normal(16).astype(f) * f(0.1),
        "mean": rng.standard_normal(16).astype(f) * f(0.1),
        "var": rng.uniform(0.5, 2.0, 16).astype(f),
        "fc_w": rng.standard_normal((1024, 10)).astype(f) * f(0.05),
        "fc_b": np.zeros(10, f),
    }
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 1])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in p.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


MAKE_RESNET = r"""
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras, bnexport
model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
bnexport.export(model, sys.argv[1], verify=False)
"""


def resnet50_onnx() -> Path:
    path = CACHE / "resnet50.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"exporting ResNet50 (weights=None) to {path} ...", flush=True)
        subprocess.run([sys.executable, "-c", MAKE_RESNET, str(path)], check=True)
    return path


def digits_onnx(given: str | None = None) -> tuple[Path, str]:
    if given:
        return Path(given), f"given {given}"
    quickstart = ROOT / "bnexport-out" / "digits.onnx"
    if quickstart.exists():
        return quickstart, "quickstart bnexport-out/digits.onnx"
    path = CACHE / "digits_cnn.onnx"
    if not path.exists():
        build_digits_cnn(path)
    return path, "onnx.helper digits-like CNN (quickstart model not found)"


# -- server -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m bnexport serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, max_batch: int, timeout_ms: float) -> None:
        self.port = _free_port()
        self.url = f"127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "bnexport", "serve", str(model), "--port", str(self.port),
            "--max-batch", str(max_batch), "--batch-timeout-ms", str(timeout_ms),
            "--log-level", "warning", *SERVER_ARGS,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"http://{self.url}/metrics").text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _metric_sum(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


# -- load -------------------------------------------------------------------------------------
async def _load(url, model_name, in_name, out_name, pool, expected, n, concurrency):
    """``n`` requests from ``concurrency`` clients; returns (latencies, errors, wall seconds)."""
    import tritonclient.http.aio as aio
    from tritonclient.http import InferInput, InferRequestedOutput

    inputs = []
    for x in pool:
        inp = InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        inputs.append(inp)
    outputs = [InferRequestedOutput(out_name, binary_data=True)]
    client = aio.InferenceServerClient(url, conn_limit=concurrency)
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        while (i := next(counter)) < n:
            k = i % len(pool)
            t0 = time.perf_counter()
            try:
                res = await client.infer(model_name, [inputs[k]], outputs=outputs)
                got = res.as_numpy(out_name)
                if not np.allclose(got, expected[k], rtol=1e-5, atol=1e-6):
                    errors.append(f"wrong answer, max diff {np.abs(got - expected[k]).max()}")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(repr(exc)[:200])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return latencies, errors, wall


def bench_model(label, path, in_name, out_name, shape, n, concurrency, timeout_ms, warmup, rounds):
    """Both servers (max_batch 1 and 32) run side by side; the load alternates between them
    in ``rounds`` rounds of ``n / rounds`` requests, so a change in the machine's load
    (it is shared) hits both alike. Throughput = requests / summed wall time."""
    from bnexport.runtime.session import Session

    rng = np.random.default_rng(0)
    pool = [rng.uniform(0, 1, (1, *shape)).astype(np.float32) for _ in range(8)]
    sess = Session(str(path))
    expected = [sess.run({in_name: x})[out_name] for x in pool]
    del sess
    batches = (1, 32)
    servers = {}
    try:
        for mb in batches:
            servers[mb] = Server(path, mb, timeout_ms)
        acc = {mb: {"lat": [], "errors": [], "wall": 0.0, "rounds": []} for mb in batches}
        for mb, server in servers.items():
            asyncio.run(
                _load(server.url, label, in_name, out_name, pool, expected, warmup, concurrency)
            )
            acc[mb]["rss0"] = server.rss_mb()
            acc[mb]["before"] = server.metrics()
        per_round = max(1, n // rounds)
        for r in range(rounds):
            for mb in batches if r % 2 == 0 else batches[::-1]:
                lat, errors, wall = asyncio.run(
                    _load(
                        servers[mb].url,
                        label,
                        in_name,
                        out_name,
                        pool,
                        expected,
                        per_round,
                        concurrency,
                    )
                )
                a = acc[mb]
                a["lat"] += lat
                a["errors"] += errors
                a["wall"] += wall
                a["rounds"].append(per_round / wall)
        rows = []
        for mb, server in servers.items():
            a = acc[mb]
            after = server.metrics()
            runs = _metric_sum(after, "bnexport_batch_size_count") - _metric_sum(
                a["before"], "bnexport_batch_size_count"
            )
            nrows = _metric_sum(after, "bnexport_batch_size_sum") - _metric_sum(
                a["before"], "bnexport_batch_size_sum"
            )
            lat_ms = np.array(a["lat"]) * 1000
            rss1 = server.rss_mb()
            row = {
                "model": label,
                "max_batch": mb,
                "requests": per_round * rounds,
                "concurrency": concurrency,
                "rounds": rounds,
                "throughput_rps": per_round * rounds / a["wall"],
                "round_throughputs_rps": a["rounds"],
                "p50_ms": float(np.percentile(lat_ms, 50)),
                "p99_ms": float(np.percentile(lat_ms, 99)),
                "errors": len(a["errors"]),
                "first_errors": a["errors"][:3],
                "model_runs": int(runs),
                "mean_batch": nrows / runs if runs else float("nan"),
                "rss_after_warmup_mb": a["rss0"],
                "rss_end_mb": rss1,
                "rss_growth_pct": 100 * (rss1 - a["rss0"]) / a["rss0"],
                "rss_growth_mb": rss1 - a["rss0"],
                "wall_s": a["wall"],
            }
            rows.append(row)
            print(_row(row), flush=True)
        ratios = [b / u for u, b in zip(acc[1]["rounds"], acc[32]["rounds"], strict=True)]
        rows[-1]["round_speedups"] = ratios
        return rows
    finally:
        for server in servers.values():
            server.stop()


def overhead(path, in_name, out_name, shape, n):
    """Median latency of one sequential client vs in-process Session.run, same input."""
    from bnexport.runtime.session import Session

    x = np.random.default_rng(1).uniform(0, 1, (1, *shape)).astype(np.float32)
    sess = Session(str(path))
    for _ in range(200):
        sess.run({in_name: x})
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        sess.run({in_name: x})
        t.append(time.perf_counter() - t0)
    expected = [sess.run({in_name: x})[out_name]]
    del sess
    server = Server(path, 1, 0.0)
    try:
        asyncio.run(_load(server.url, path.stem, in_name, out_name, [x], expected, 200, 1))
        before = server.metrics()
        lat, errors, _ = asyncio.run(
            _load(server.url, path.stem, in_name, out_name, [x], expected, n, 1)
        )
        after = server.metrics()
    finally:
        server.stop()

    def mean(name):
        d = _metric_sum(after, name + "_sum") - _metric_sum(before, name + "_sum")
        c = _metric_sum(after, name + "_count") - _metric_sum(before, name + "_count")
        return d / c

    session_p50 = float(np.median(t) * 1000)
    client_p50 = float(np.median(lat) * 1000)
    return {
        "requests": n,
        "session_run_p50_ms": session_p50,
        "server_roundtrip_p50_ms": client_p50,
        "overhead_p50_ms": client_p50 - session_p50,
        "in_handler_overhead_mean_ms": 1000
        * (mean("bnexport_request_latency_seconds") - mean("bnexport_run_latency_seconds")),
        "errors": len(errors),
    }


def batch_scaling(path: Path, in_name: str, shape: tuple, batch: int) -> dict:
    """In-process Session.run time per sample at batch 1 and ``batch`` (best of several
    runs): the most that dynamic batching can gain on this machine, whatever the server."""
    from bnexport.runtime.session import Session

    sess = Session(str(path))
    out = {}
    for b, reps in ((1, 16), (batch, 4)):
        x = np.random.default_rng(2).uniform(0, 1, (b, *shape)).astype(np.float32)
        sess.run({in_name: x})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run({in_name: x})
            times.append(time.perf_counter() - t0)
        out[f"ms_per_sample_batch{b}"] = min(times) / b * 1000
    out["max_batching_speedup"] = out["ms_per_sample_batch1"] / out[f"ms_per_sample_batch{batch}"]
    return out


def _row(r: dict) -> str:
    return (
        f"{r['model']:<9} max_batch={r['max_batch']:<3} n={r['requests']:<6} "
        f"c={r['concurrency']:<3} {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:8.2f} ms  "
        f"p99 {r['p99_ms']:8.2f} ms  errors {r['errors']:<3} runs {r['model_runs']:<6} "
        f"mean batch {r['mean_batch']:5.1f}  RSS {r['rss_after_warmup_mb']:.0f}->"
        f"{r['rss_end_mb']:.0f} MB ({r['rss_growth_mb']:+.0f} MB, {r['rss_growth_pct']:+.1f}%)"
    )


def peers(args: argparse.Namespace, models: list[str]) -> dict:
    """The ``peers`` section: rows, bnexport/MLServer ratios, c=1 overheads (see serve_peer)."""
    import onnx
    import serve_peer
    from export_bench import cpu_description, print_cpu

    venv = Path(args.peer_venv) if args.peer_venv else None
    concurrency = [int(c) for c in args.peer_concurrency.split(",")]
    variants = {}
    for spec in args.peer_variant:
        name, sep, extra = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--peer-variant wants NAME=ARGS. Received: {spec!r}")
        variants[f"bnexport-{name}"] = extra.split()
    out: dict = {
        "rows": [],
        "skipped": serve_peer.peer_available(venv),
        "overhead_ms": [],
        "variants": variants,
        "cpu": cpu_description(),
    }
    print_cpu(out["cpu"])
    specs = []
    if "digits" in models:
        path, _ = digits_onnx(args.digits_onnx)
        specs.append((path.stem, path, (8, 8, 1), args.peer_digits_requests, 200, True))
    if "resnet50" in models:
        # no overhead row: a run of ~100 ms hides a server's sub-millisecond overhead in noise
        specs.append(
            ("resnet50", resnet50_onnx(), (224, 224, 3), args.peer_resnet_requests, 16, False)
        )
    for label, path, shape, n, warmup, with_overhead in specs:
        g = onnx.load(str(path), load_external_data=False).graph
        in_name, out_name = g.input[0].name, g.output[-1].name
        floor = serve_peer.session_p50_ms(path, in_name, shape) if with_overhead else None
        rows = serve_peer.bench_peers(
            label, path, in_name, out_name, shape, {c: max(n, 2 * c) for c in concurrency},
            args.rounds, venv, SERVER_ARGS, warmup, variants,
        )  # fmt: skip
        for r in rows:
            if r["concurrency"] == 1 and floor is not None:
                out["overhead_ms"].append(
                    {
                        "model": label,
                        "server": r["server"],
                        "protocol": r["protocol"],
                        "session_run_p50_ms": floor,
                        "overhead_p50_ms": r["p50_ms"] - floor,
                    }
                )
        out["rows"] += rows
    out["ratios"] = serve_peer.ratios(out["rows"])
    out["cpu_end"] = cpu_description()  # the load average after the run, beside the one before
    for name, extra in variants.items():
        print(f"{name}: bnexport serve {' '.join(extra)}")
    print("\nmodel      c    server       protocol       req/s     p50 ms     p99 ms  errors")
    for r in out["rows"]:
        print(
            f"{r['model']:<10} {r['concurrency']:<4} {r['server']:<12} {r['protocol']:<10} "
            f"{r['throughput_rps']:9.1f} {r['p50_ms']:10.2f} {r['p99_ms']:10.2f} {r['errors']:7d}"
        )
    print(
        "\nbnexport / MLServer                              c   req/s ratio  p50 ratio  p99 ratio"
    )
    for q in out["ratios"]:
        print(
            f"{q['model']:<10} {q['server']:<12} {q['comparison']:<20} {q['concurrency']:<4} "
            f"{q['throughput_ratio']:9.2f} {q['p50_ratio']:10.2f} {q['p99_ratio']:10.2f}"
        )
    print(f"load average at the end: {out['cpu_end']['loadavg']}")
    print("\noverhead over Session.run at 1 client (p50)")
    for o in out["overhead_ms"]:
        print(
            f"{o['model']:<10} {o['server']:<9} {o['protocol']:<10} "
            f"{o['overhead_p50_ms']:8.3f} ms (Session.run {o['session_run_p50_ms']:.3f} ms)"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,resnet50", help="comma-separated")
    parser.add_argument("--digits-requests", type=int, default=10_000)
    parser.add_argument("--digits-onnx", default=None, help="default: bnexport-out/digits.onnx")
    parser.add_argument("--resnet-requests", type=int, default=320)
    parser.add_argument("--overhead-requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=4, help="alternating load rounds")
    parser.add_argument("--resnet-warmup", type=int, default=320, help="warm-up requests")
    parser.add_argument(
        "--server-args", default="", help="extra `bnexport serve` arguments, space-separated"
    )
    parser.add_argument(
        "--sections",
        default="overhead,batching,peers",
        help="comma-separated: overhead (digits, 1 client vs Session.run), batching "
        "(max_batch 1 vs 32), peers (HTTP/gRPC vs MLServer), ray (digits: one process vs "
        "Ray Serve replicas, needs bnexport[ray]; not in the default)",
    )
    parser.add_argument(
        "--peer-venv",
        default=os.environ.get("BNEXPORT_MLSERVER_VENV", "/tmp/mlserver-venv"),
        help="venv with mlserver==1.7.1 and onnxruntime (default $BNEXPORT_MLSERVER_VENV or "
        "/tmp/mlserver-venv); absent: MLServer rows are skipped",
    )
    parser.add_argument("--peer-concurrency", default="1,32", help="client counts of peers")
    parser.add_argument(
        "--peer-variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="another bnexport server in the peers section, e.g. 'i2=--instances 2' (row "
        "server bnexport-i2), driven in the same interleaved rounds; repeatable",
    )
    parser.add_argument("--peer-digits-requests", type=int, default=1000, help="per target")
    parser.add_argument("--peer-resnet-requests", type=int, default=64, help="per target")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    SERVER_ARGS[:] = args.server_args.split()
    results_args = vars(args)
    models = args.models.split(",")
    sections = set(args.sections.split(","))
    results: dict = {"runs": [], "cpu_count": os.cpu_count(), "args": results_args}
    if "peers" in sections:
        results["peers"] = peers(args, models)
    if "ray" in sections:
        import serve_ray
        from export_bench import cpu_description, print_cpu

        results["cpu"] = cpu_description()
        print_cpu(results["cpu"])
        path, source = digits_onnx(args.digits_onnx)
        print(f"section ray: {source}, {args.digits_requests} requests at {args.concurrency} "
              "clients per target")  # fmt: skip
        results["ray"] = serve_ray.bench(path, args.digits_requests, args.concurrency, SERVER_ARGS)
    if "digits" in models and sections & {"overhead", "batching"}:
        path, source = digits_onnx(args.digits_onnx)
        results["digits_source"] = source
        print(f"digits model: {source}")
        import onnx

        g = onnx.load(str(path)).graph
        in_name, out_name = g.input[0].name, g.output[-1].name
        if "overhead" in sections:
            ov = overhead(path, in_name, out_name, (8, 8, 1), args.overhead_requests)
            results["overhead"] = ov
            print(
                f"overhead (1 client, {ov['requests']} req): Session.run p50 "
                f"{ov['session_run_p50_ms']:.3f} ms, server round trip p50 "
                f"{ov['server_roundtrip_p50_ms']:.3f} ms -> {ov['overhead_p50_ms']:.3f} "
                f"ms/request (in-handler {ov['in_handler_overhead_mean_ms']:.3f} ms), "
                f"errors {ov['errors']}"
            )
        if "batching" in sections:
            results["runs"] += bench_model(
                path.stem, path, in_name, out_name, (8, 8, 1), args.digits_requests,
                args.concurrency, args.batch_timeout_ms, warmup=500, rounds=args.rounds,
            )  # fmt: skip
    if "resnet50" in models and "batching" in sections:
        path = resnet50_onnx()
        import onnx

        g = onnx.load(str(path), load_external_data=False).graph
        scale = batch_scaling(path, g.input[0].name, (224, 224, 3), args.concurrency)
        results["resnet50_inprocess_scaling"] = scale
        print(
            f"resnet50 in-process Session.run: {scale['ms_per_sample_batch1']:.1f} ms/image at "
            f"batch 1, {scale[f'ms_per_sample_batch{args.concurrency}']:.1f} ms/image at batch "
            f"{args.concurrency} -> batching can gain at most {scale['max_batching_speedup']:.2f}x",
            flush=True,
        )
        results["runs"] += bench_model(
            "resnet50", path, g.input[0].name, g.output[0].name, (224, 224, 3),
            args.resnet_requests, args.concurrency, args.batch_timeout_ms,
            warmup=args.resnet_warmup, rounds=args.rounds,
        )  # fmt: skip
    by_model: dict[str, dict[int, float]] = {}
    for r in results["runs"]:
        by_model.setdefault(r["model"], {})[r["max_batch"]] = r["throughput_rps"]
    results["batching_speedup"] = {
        m: v[32] / v[1] for m, v in by_model.items() if 1 in v and 32 in v
    }
    if results["runs"]:
        print(
            "\nmodel      max_batch   req/s     p50 ms    p99 ms   errors  mean batch  RSS growth"
        )
    for r in results["runs"]:
        print(
            f"{r['model']:<10} {r['max_batch']:>9} {r['throughput_rps']:8.1f} {r['p50_ms']:9.2f} "
            f"{r['p99_ms']:9.2f} {r['errors']:8d} {r['mean_batch']:11.1f} "
            f"{r['rss_growth_pct']:+9.1f}%"
        )
    for m, s in results["batching_speedup"].items():
        print(f"batching speed-up ({m}, {args.concurrency} clients): {s:.2f}x")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
