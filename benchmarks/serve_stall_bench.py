"""Does one large request stall the server? Health latency and memory while it is processed.

For each source tree given (``--tree LABEL=PATH``, default: this checkout), for each
scenario, for each round (trees interleaved within a round), the benchmark:

1. starts ``serve_model`` of that tree in its own process (PYTHONPATH=PATH) on the
   digits test model, with the body limit of the scenario;
2. probes ``/v2/health/live`` and ``/ready`` every 5 ms for 1 s (idle);
3. sends one body of the full limit with ``curl`` (a third process) and keeps probing
   until the answer arrives (busy);
4. reads the server's peak RSS (``VmHWM``) and its RSS before the request, and the
   peak RSS of its child processes (the JSON decode helper, where there is one).

Scenarios: ``binary-64``: 64 MiB of FP32 binary tensor data (262,128 rows);
``json-16``: a 16 MiB JSON body (4.2 M numbers); ``json-64`` (on request): 64 MiB of
JSON (16.8 M numbers). Prints one table and, with
``--json PATH``, writes every measurement.

    python benchmarks/serve_stall_bench.py --tree before=/tmp/base --tree after=. --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import inspect, sys
from bnexport.serve.server import serve_model
s = dict(host="127.0.0.1", port=int(sys.argv[2]), max_body_mb=float(sys.argv[3]),
         log_level="warning")
show = lambda line: print(line, flush=True)
if "settings" in inspect.signature(serve_model).parameters:
    from bnexport.serve.settings import ServeSettings
    serve_model(sys.argv[1], ServeSettings(**s), print_fn=show)
else:  # a tree from before serve_model(path, settings)
    serve_model(sys.argv[1], **s, print_fn=show)
"""
SCENARIOS = {"binary-64": ("binary", 64), "json-16": ("json", 16), "json-64": ("json", 64)}
DEFAULT_SCENARIOS = ["binary-64", "json-16"]


def _repo(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    import onnx
    from serve_models import digits_cnn

    (tmp / "repo" / "digits" / "1").mkdir(parents=True)
    onnx.save(digits_cnn(0), tmp / "repo" / "digits" / "1" / "model.onnx")
    return tmp / "repo"


def _body(kind: str, limit: int) -> tuple[bytes, dict]:
    if kind == "binary":
        rows = (limit - 4096) // 256
        x = np.full((rows, 8, 8, 1), 0.5, np.float32)
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    rows = (limit - 200) // (64 * 4)
    head = b'{"inputs":[{"name":"image","shape":[%d,8,8,1],"datatype":"FP32","data":[' % rows
    return head + b"0.5," * (rows * 64 - 1) + b"0.5]}]}", {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _probe(client, url: str, until) -> list[float]:
    out: list[float] = []
    paths = ["/v2/health/live", "/v2/health/ready"]
    while not until():
        start = time.perf_counter()
        client.get(url + paths[len(out) % 2])
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(0.005)
    return out


def measure(tree: Path, repo: Path, body_file: Path, headers: dict, limit_mb: int) -> dict:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(repo), str(port), str(limit_mb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=repo,  # not the checkout: ``python -c`` puts the cwd first on sys.path
    )
    try:
        while not server.stdout.readline().startswith("Serving"):
            if server.poll() is not None:
                raise RuntimeError(f"server of {tree} did not start")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            for _ in range(100):
                try:
                    client.get(url + "/v2/health/live")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            rss_before = _status_kb(server.pid, "VmRSS")
            t_end = time.monotonic() + 1.0
            idle = _probe(client, url, lambda: time.monotonic() > t_end)
            curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary"]
            curl += [f"@{body_file}", "-H", "Content-Type: application/json"]
            for k, v in headers.items():
                curl += ["-H", f"{k}: {v}"]
            start = time.perf_counter()
            sender = subprocess.Popen(
                [*curl, url + "/v2/models/digits/infer"], stdout=subprocess.PIPE, text=True
            )
            busy = _probe(client, url, lambda: sender.poll() is not None)
            seconds = time.perf_counter() - start
            status = sender.communicate()[0]
        peak = _status_kb(server.pid, "VmHWM")
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        helper_peak = max((_status_kb(int(c), "VmHWM") for c in children), default=0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "status": status,
        "request_s": seconds,
        "idle_p99_ms": float(np.percentile(idle, 99)),
        "busy_p50_ms": float(np.percentile(busy, 50)),
        "busy_p99_ms": float(np.percentile(busy, 99)),
        "busy_max_ms": float(np.max(busy)),
        "probes": len(busy),
        "rss_before_mb": rss_before / 1024,
        "rss_peak_growth_mb": (peak - rss_before) / 1024,
        "helper_peak_mb": helper_peak / 1024,  # the JSON decode process, where there is one
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH (repeatable)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(ROOT)]]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = _repo(Path(tmp))
        for name in args.scenario or DEFAULT_SCENARIOS:
            kind, limit_mb = SCENARIOS[name]
            body, headers = _body(kind, limit_mb << 20)
            body_file = Path(tmp) / f"{name}.bin"
            body_file.write_bytes(body)
            del body
            for r in range(args.rounds):
                for label, path in trees:
                    row = measure(Path(path).resolve(), repo, body_file, headers, limit_mb)
                    row.update(scenario=name, tree=label, round=r)
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    cols = ["idle_p99_ms", "busy_p50_ms", "busy_p99_ms", "busy_max_ms", "request_s"]
    cols += ["rss_peak_growth_mb", "helper_peak_mb"]
    print(f"{'scenario':<10} {'tree':<8} " + " ".join(f"{c:>18}" for c in cols))
    for name in args.scenario or DEFAULT_SCENARIOS:
        for label, _ in trees:
            rows = [r for r in results if r["scenario"] == name and r["tree"] == label]
            cells = [float(np.median([r[c] for r in rows])) for c in cols]
            print(f"{name:<10} {label:<8} " + " ".join(f"{v:>18.1f}" for v in cells))
    if args.json:
        args.json.write_text(json.dumps({"trees": dict(trees), "results": results}, indent=1))


if __name__ == "__main__":
    main()
