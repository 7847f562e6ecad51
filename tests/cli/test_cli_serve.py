"""``bnexport serve`` as a real process: the printed curl example works, SIGTERM drains.

Model: y = x @ W (W = arange(12).reshape(4, 3)); integer-valued inputs make the
float32 result exact, so answers are compared with NumPy exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import metric, wait_until
from support.servers import free_port

from bnexport.cli.main import main

W = np.arange(12, dtype=np.float32).reshape(4, 3)


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("cli") / "mlp.onnx"
    onnx.save(model, path)
    return path


def _start(model, *extra: str) -> tuple[subprocess.Popen, int, list[str]]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bnexport", "serve", str(model), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).is_success
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 30, interval=0.1, message="server did not become ready")
    except AssertionError:
        proc.kill()
        raise
    return proc, port, lines


def _inflight(port: int) -> float:
    """Requests of ``mlp`` in the server now (the gauge appears with the first request)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return metric(text, "bnexport_inflight_requests", {"model": "mlp"}, default=0.0)


def test_usage_errors(mlp_onnx, capsys):
    assert main(["serve", str(mlp_onnx), "--max-batch", "0"]) == 2
    assert "--max-batch=0" in capsys.readouterr().err


@pytest.mark.needs("curl", unverified="running the printed curl example")
def test_curl_example_and_sigterm_drain(mlp_onnx):
    proc, port, stdout = _start(
        mlp_onnx, "--batch-timeout-ms", "1500", "--max-batch", "8", "--batch-policy", "window"
    )
    try:

        def curl_line() -> str | None:  # stdout is read by a thread: the line may lag /ready
            return next((x.strip() for x in stdout if x.strip().startswith("curl ")), None)

        wait_until(curl_line, 10, interval=0.05, message="no curl example printed")
        curl = curl_line()
        answer = json.loads(
            subprocess.run(curl, shell=True, capture_output=True, check=True).stdout
        )
        assert answer["outputs"][0]["data"] == [0.0, 0.0, 0.0]  # all-zeros example input

        results: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            x = np.full((1, 4), i, np.float32)
            body = {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}
                ]
            }
            results[i] = httpx.post(
                f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=body, timeout=10
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        # all four wait in the batcher (1.5 s window)
        wait_until(lambda: _inflight(port) >= 4, 20, message="requests never reached the server")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(10)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for i in range(4):
        assert results[i].status_code == 200, results[i].text
        got = np.array(results[i].json()["outputs"][0]["data"], np.float32)
        np.testing.assert_array_equal(got, (np.full((1, 4), i, np.float32) @ W).ravel())
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(r["event"] == "draining" for r in logs)
    assert any(r["event"] == "request" and r["status"] == 200 for r in logs)


def test_busy_grpc_port_is_one_line_before_any_banner(mlp_onnx):
    """Both ports are bound before anything is printed; gRPC core's own E-line is caught."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        cmd = [sys.executable, "-m", "bnexport", "serve", str(mlp_onnx), "--port", "0"]
        proc = subprocess.run(
            cmd + ["--grpc-port", str(port)], capture_output=True, text=True, env=env, timeout=120
        )
    assert proc.returncode == 2  # an unusable --grpc-port, like a busy --port
    assert proc.stdout == ""  # no banner, no curl example
    plain = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert plain == [
        f"bnexport serve: error: cannot serve gRPC on 127.0.0.1:{port}: Address already in use "
        "(the port is in use by another process; choose another --grpc-port)"
    ], proc.stderr
    assert "add_port.cc" not in proc.stderr


def test_quiet_serve_logs_warnings_only(mlp_onnx):
    proc, port, stdout = _start(mlp_onnx, "-q", "--no-warmup")
    try:
        wait_until(  # the reader thread may lag the health check
            lambda: any(line.startswith("Serving mlp on http://") for line in stdout),
            10,
            message=lambda: str(stdout),
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert logs == [] or all(r["level"] in ("warning", "error") for r in logs), logs
