"""Protocol rows of ``serve_bench.py``: bnexport over HTTP and gRPC against MLServer.

Targets (each one server process on loopback, all started before the load and
driven in interleaved rounds, so a change in the shared machine's load hits
them alike):

=====================  ==========================================================
``bnexport/http-bin``  ``bnexport serve --grpc-port``: KServe v2 HTTP, binary tensors
``bnexport/http-json`` the same server, JSON tensors (what MLServer's HTTP speaks)
``bnexport/grpc``      the same server, gRPC, ``raw_input_contents``
``mlserver/http-json`` MLServer 1.7.1, custom onnxruntime runtime, adaptive batching
``mlserver/grpc``      the same MLServer, gRPC, ``raw_input_contents``
=====================  ==========================================================

MLServer has no binary-tensor extension over HTTP, so its HTTP rows use JSON;
compare them with ``bnexport/http-json`` for the same encoding, and with
``bnexport/http-bin`` for what each server offers at its best. The ratios also
set each bnexport protocol against the better of MLServer's two rows (``vs best``).
More bnexport servers with other settings (``variants``, e.g. ``--instances 2``)
can run beside the default one in the same interleaved rounds. Both servers merge
up to 32 requests (bnexport: ``--max-batch 32 --batch-timeout-ms 2``, adaptive;
MLServer: ``max_batch_size 32, max_batch_time 0.002``). The clients are
``tritonclient.http.aio`` / ``tritonclient.grpc.aio`` in this process; every
answer is checked against onnxruntime in this process.

MLServer runs from its own venv (``--peer-venv``, e.g. made with
``python -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install
mlserver==1.7.1 uvloop==0.21.0 onnxruntime``) with the runtime in
``benchmarks/mlserver_runtime/``; without that venv its rows are skipped with a
message.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUNTIME_DIR = Path(__file__).resolve().parent / "mlserver_runtime"
MAX_BATCH = 32
BATCH_TIMEOUT_MS = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, what: str, log: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited before it was ready: {tail}")
        try:
            if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready")


class BnexportServer:
    """``python -m bnexport serve MODEL --grpc-port P`` (HTTP and gRPC, one process)."""

    def __init__(self, model: Path, extra_args: list[str]) -> None:
        self.http = f"127.0.0.1:{free_port()}"
        self.grpc = f"127.0.0.1:{free_port()}"
        cmd = [
            sys.executable, "-m", "bnexport", "serve", str(model),
            "--port", self.http.split(":")[1], "--grpc-port", self.grpc.split(":")[1],
            "--max-batch", str(MAX_BATCH), "--batch-timeout-ms", str(BATCH_TIMEOUT_MS),
            "--log-level", "warning", *extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ready(self.proc, self.http, "bnexport serve")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class MLServerPeer:
    """``mlserver start DIR`` from ``venv`` serving ``model`` with the onnxruntime runtime."""

    def __init__(self, venv: Path, model: Path, name: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mlserver-"))
        self.http = f"127.0.0.1:{free_port()}"
        self.grpc = f"127.0.0.1:{free_port()}"
        settings = {
            "http_port": int(self.http.split(":")[1]),
            "grpc_port": int(self.grpc.split(":")[1]),
            "metrics_port": free_port(),
            "host": "127.0.0.1",
            "debug": False,
            # responses uncompressed, like bnexport's (tritonclient.http.aio does not inflate)
            "gzip_enabled": False,
        }
        (self.dir / "settings.json").write_text(json.dumps(settings))
        (self.dir / name).mkdir()
        model_settings = {
            "name": name,
            "implementation": "ort_runtime.OnnxRuntimeModel",
            "max_batch_size": MAX_BATCH,
            "max_batch_time": BATCH_TIMEOUT_MS / 1000,
            "parameters": {"uri": str(model.resolve())},
        }
        (self.dir / name / "model-settings.json").write_text(json.dumps(model_settings))
        env = {**os.environ, "PYTHONPATH": str(RUNTIME_DIR)}
        self.log = self.dir / "mlserver.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(venv / "bin" / "mlserver"), "start", str(self.dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
            )
        try:
            _wait_ready(self.proc, self.http, "mlserver", self.log)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def peer_available(venv: Path | None) -> str | None:
    """``None`` when MLServer can run from ``venv``, else why its rows are skipped."""
    if venv is None:
        return "no --peer-venv given"
    if not (venv / "bin" / "mlserver").exists():
        return (
            f"no MLServer venv at {venv} (create it: python -m venv {venv} && {venv}/bin/pip "
            "install mlserver==1.7.1 uvloop==0.21.0 onnxruntime)"
        )
    return None


# -- clients ----------------------------------------------------------------------------------
async def _drive(call, n: int, concurrency: int, check) -> tuple[list[float], list[str], float]:
    """``n`` calls from ``concurrency`` workers; latencies, errors, wall seconds."""
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        while (i := next(counter)) < n:
            t0 = time.perf_counter()
            try:
                err = check(i, await call(i))
                if err:
                    errors.append(err)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(repr(exc)[:200])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


async def load(protocol, url, model, in_name, out_name, pool, expected, n, concurrency):
    """Drive ``url`` with ``protocol`` (``http-bin``, ``http-json`` or ``grpc``)."""

    def check(i: int, got: np.ndarray) -> str | None:
        want = expected[i % len(pool)]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            return f"wrong answer for request {i}"
        return None

    if protocol == "grpc":
        import tritonclient.grpc.aio as aio

        client = aio.InferenceServerClient(url)
        inputs = []
        for x in pool:
            inp = aio.InferInput(in_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            inputs.append(inp)
        outputs = [aio.InferRequestedOutput(out_name)]
        headers = None
    else:
        import tritonclient.http.aio as aio

        binary = protocol == "http-bin"
        client = aio.InferenceServerClient(url, conn_limit=concurrency)
        inputs = []
        for x in pool:
            inp = aio.InferInput(in_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            inputs.append(inp)
        outputs = [aio.InferRequestedOutput(out_name, binary_data=binary)]
        # tritonclient.http.aio sends no Content-Type; MLServer (FastAPI) needs it for JSON
        headers = None if binary else {"Content-Type": "application/json"}

    async def call(i: int) -> np.ndarray:
        res = await client.infer(model, [inputs[i % len(inputs)]], outputs=outputs, headers=headers)
        return res.as_numpy(out_name)

    try:
        return await _drive(call, n, concurrency, check)
    finally:
        await client.close()


def bench_peers(
    label: str,
    path: Path,
    in_name: str,
    out_name: str,
    shape: tuple,
    requests: dict[int, int],
    rounds: int,
    venv: Path | None,
    server_args: list[str],
    warmup: int,
    variants: dict[str, list[str]] | None = None,
) -> list[dict]:
    """Rows ``{model, concurrency, server, protocol, req/s, p50, p99, errors}``.

    Args:
        requests: ``{concurrency: requests per target}`` (split over ``rounds``).
        server_args: extra ``bnexport serve`` arguments of the server named ``bnexport``.
        variants: more bnexport servers, ``{name: extra arguments}`` (e.g.
            ``{"bnexport-i2": ["--instances", "2"]}``), started beside it and driven in the
            same interleaved rounds, so that settings compare under the same load.
    """
    from bnexport.runtime.session import Session

    rng = np.random.default_rng(0)
    pool = [rng.uniform(0, 1, (1, *shape)).astype(np.float32) for _ in range(8)]
    sess = Session(str(path))
    expected = [sess.run({in_name: x})[out_name] for x in pool]
    del sess
    servers: dict[str, object] = {}
    targets: list[tuple[str, str, str]] = []  # (server, protocol, url)
    why = peer_available(venv)
    try:
        for name, args in {"bnexport": server_args, **(variants or {})}.items():
            ours = servers[name] = BnexportServer(path, args)
            targets += [
                (name, "http-bin", ours.http),
                (name, "http-json", ours.http),
                (name, "grpc", ours.grpc),
            ]
        if why is None:
            peer = servers["mlserver"] = MLServerPeer(venv, path, label)
            targets += [("mlserver", "http-json", peer.http), ("mlserver", "grpc", peer.grpc)]
        else:
            print(f"MLServer rows skipped: {why}", flush=True)
        for _, protocol, url in targets:  # warm-up: sessions, arenas, connections
            asyncio.run(load(protocol, url, label, in_name, out_name, pool, expected, warmup, 8))
        rows = []
        for concurrency, n in requests.items():
            acc = {t: {"lat": [], "errors": [], "wall": 0.0} for t in targets}
            per_round = max(concurrency, n // rounds)
            for r in range(rounds):
                order = targets[r % len(targets) :] + targets[: r % len(targets)]
                for t in order:
                    lat, errors, wall = asyncio.run(
                        load(
                            t[1], t[2], label, in_name, out_name, pool, expected, per_round,
                            concurrency,
                        )
                    )  # fmt: skip
                    acc[t]["lat"] += lat
                    acc[t]["errors"] += errors
                    acc[t]["wall"] += wall
            for (server, protocol, _), a in acc.items():
                lat_ms = np.array(a["lat"]) * 1000
                row = {
                    "model": label,
                    "concurrency": concurrency,
                    "server": server,
                    "protocol": protocol,
                    "requests": per_round * rounds,
                    "throughput_rps": per_round * rounds / a["wall"],
                    "p50_ms": float(np.percentile(lat_ms, 50)),
                    "p99_ms": float(np.percentile(lat_ms, 99)),
                    "errors": len(a["errors"]),
                    "first_errors": a["errors"][:3],
                }
                rows.append(row)
                print(format_row(row), flush=True)
        return rows
    finally:
        for server in servers.values():
            server.stop()


def session_p50_ms(path: Path, in_name: str, shape: tuple, n: int = 300) -> float:
    """Median in-process ``Session.run`` time of one sample (the floor under a c=1 row)."""
    from bnexport.runtime.session import Session

    sess = Session(str(path))
    x = np.random.default_rng(1).uniform(0, 1, (1, *shape)).astype(np.float32)
    for _ in range(min(20, n)):
        sess.run({in_name: x})
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sess.run({in_name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def format_row(r: dict) -> str:
    return (
        f"{r['model']:<10} c={r['concurrency']:<3} {r['server']:<9} {r['protocol']:<10} "
        f"{r['throughput_rps']:9.1f} req/s  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms"
        f"  errors {r['errors']}"
    )


def ratios(rows: list[dict]) -> list[dict]:
    """bnexport / MLServer throughput and p50 per (model, concurrency, bnexport server, comparison).

    Same protocol (``grpc vs grpc``, ``http json vs json``), each server at its best over
    HTTP (``http binary vs json``), and each bnexport protocol against the better of
    MLServer's two rows (``grpc vs best``, ``http binary vs best``: MLServer's higher
    throughput, its p50 and p99 from that row).
    """
    by = {(r["model"], r["concurrency"], r["server"], r["protocol"]): r for r in rows}
    pairs = {
        "grpc vs grpc": ("grpc", "grpc"),
        "http json vs json": ("http-json", "http-json"),
        "http binary vs json": ("http-bin", "http-json"),
        "grpc vs best": ("grpc", None),
        "http binary vs best": ("http-bin", None),
    }
    ours_names = sorted({r["server"] for r in rows if r["server"].startswith("bnexport")})
    out = []
    for model, c in sorted({(r["model"], r["concurrency"]) for r in rows}):
        theirs_rows = [
            r
            for r in rows
            if r["server"] == "mlserver" and (r["model"], r["concurrency"]) == (model, c)
        ]
        best = max(theirs_rows, key=lambda r: r["throughput_rps"], default=None)
        for name in ours_names:
            for what, (ours, theirs) in pairs.items():
                a = by.get((model, c, name, ours))
                b = best if theirs is None else by.get((model, c, "mlserver", theirs))
                if a and b:
                    out.append(
                        {
                            "model": model,
                            "concurrency": c,
                            "server": name,
                            "comparison": what,
                            "mlserver_protocol": b["protocol"],
                            "throughput_ratio": a["throughput_rps"] / b["throughput_rps"],
                            "p50_ratio": a["p50_ms"] / b["p50_ms"],
                            "p99_ratio": a["p99_ms"] / b["p99_ms"],
                        }
                    )
    return out
