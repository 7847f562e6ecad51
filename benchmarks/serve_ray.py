"""Section ``ray`` of ``serve_bench.py``: one process against Ray Serve replicas.

Targets, each ``python -m bnexport serve MODEL`` in a subprocess on loopback, started
one after the other (two private Rays at once would not fit a 2-core machine):

- ``process``: the one-process server;
- ``ray x1``: ``--replicas 1`` (the cost of Ray's HTTP proxy alone);
- ``ray x2``: ``--replicas 2``.

For each: seconds from ``Popen`` to ``/v2/health/ready`` answering 200 (Ray: ``ray.init``,
Serve's proxies, every replica loading and warming up its model), the RSS of all its
processes after warm-up (found by an environment variable they inherit), then
requests/s, p50 and p99 with 1 and ``--concurrency`` clients (tritonclient.http.aio,
binary tensors, every answer checked against ``Session.run``). Needs ``bnexport[ray]``
in the running Python; without it the section says so and returns no rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

MARKER = "BNEXPORT_BENCH_MARKER"


def _rss_mb(marker: str) -> float:
    """Summed RSS of the live processes whose environment holds ``marker``."""
    needle = f"{MARKER}={marker}".encode()
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Target:
    """``bnexport serve`` (one process or ``--replicas N``) in a subprocess."""

    def __init__(self, model: Path, replicas: int | None, max_batch: int, server_args: list):
        from serve_bench import _free_port

        self.port = _free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        cmd = [
            sys.executable, "-m", "bnexport", "serve", str(model), "--port", str(self.port),
            "--max-batch", str(max_batch), "--log-level", "warning", *server_args,
        ]  # fmt: skip
        if replicas is not None:
            cmd += ["--replicas", str(replicas)]
        env = {**os.environ, MARKER: self.marker}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> float:
        """SIGTERM, wait; returns the seconds until the process exited."""
        t0 = time.perf_counter()
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.perf_counter() - t0


def bench(model: Path, requests: int, concurrency: int, server_args: list) -> dict:
    """Rows for ``process``, ``ray x1`` and ``ray x2`` (see the module docstring)."""
    import asyncio

    import onnx

    from bnexport.runtime.session import Session

    try:
        import ray.serve  # noqa: F401
    except ImportError:
        print('section ray: skipped (Ray Serve not installed: pip install "bnexport[ray]")')
        return {"rows": [], "skipped": "ray[serve] not installed"}
    from serve_bench import _load

    graph = onnx.load(str(model)).graph
    in_name, out_name = graph.input[0].name, graph.output[-1].name
    rng = np.random.default_rng(0)
    pool = [rng.uniform(0, 1, (1, 8, 8, 1)).astype(np.float32) for _ in range(8)]
    session = Session(str(model))
    expected = [session.run({in_name: x})[out_name] for x in pool]
    rows = []
    for label, replicas in (("process", None), ("ray x1", 1), ("ray x2", 2)):
        target = Target(model, replicas, 32, server_args)
        try:
            row = {"target": label, "ready_s": target.ready_s}

            def run(n: int, c: int, url: str = target.url) -> tuple:
                return asyncio.run(_load(url, model.stem, in_name, out_name, pool, expected, n, c))

            run(200, 4)  # warm-up: connections, batch sizes
            row["rss_mb"] = _rss_mb(target.marker)
            for c, n in ((1, max(100, requests // 10)), (concurrency, requests)):
                latencies, errors, wall = run(n, c)
                ms = np.array(latencies) * 1000
                row[f"c{c}"] = {
                    "requests": n,
                    "throughput_rps": n / wall,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                    "errors": len(errors),
                    "first_errors": errors[:3],
                }
        finally:
            row["stop_s"] = target.stop()
        rows.append(row)
        print(f"  {label}: ready in {row['ready_s']:.1f} s", flush=True)
    print(
        f"\n{'target':<8} {'ready s':>8} {'RSS MB':>7} {'stop s':>7}  "
        f"{'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} errors"
    )
    for r in rows:
        for key in [k for k in r if k.startswith("c") and k[1:].isdigit()]:
            q = r[key]
            print(
                f"{r['target']:<8} {r['ready_s']:8.1f} {r['rss_mb']:7.0f} {r['stop_s']:7.1f}  "
                f"{key[1:]:>3} {q['throughput_rps']:8.1f} {q['p50_ms']:8.2f} {q['p99_ms']:8.2f} "
                f"{q['errors']:6d}"
            )
    return {"rows": rows, "model": str(model)}
