"""``bnexport serve --grpc-port`` end to end: a subprocess, real signals, real ports."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serve_helpers import make_app, metric
from serve_models import digits_reference, images
from support import async_wait_until, wait_until
from support.servers import free_port

from bnexport.errors import UsageError
from bnexport.serve.grpc.server import GrpcFrontend

RTOL, ATOL = 1e-4, 1e-5


def _received(text: str) -> float:
    """digits requests answered (any version) or being handled, from Prometheus text."""
    total = 0.0
    for version in ("1", "2"):
        labels = {"model": "digits", "version": version}
        total += metric(text, "bnexport_requests_total", labels, default=0.0)
        total += metric(text, "bnexport_inflight_requests", labels, default=0.0)
    return total


def test_cli_serves_grpc_and_drains_on_sigterm(repo_dir):
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNEXPORT_SERVE_TOKEN": "tok"}
    cmd = [
        sys.executable, "-m", "bnexport", "serve", str(repo_dir), "--port", str(http_port),
        "--grpc-port", str(grpc_port), "--model-control", "explicit", "--no-warmup",
        "--batch-policy", "window", "--batch-timeout-ms", "300", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

        def ready() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                return client.is_server_ready()
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        wait_until(ready, 60, interval=0.2, message="server did not start")
        auth = {"authorization": "Bearer tok"}
        x = images(2, seed=8)
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("digits", [inp], model_version="1", headers=auth).as_numpy("probs")
        np.testing.assert_allclose(got, digits_reference(x, 0)["probs"], RTOL, ATOL)
        client.load_model("gather", headers=auth)  # explicit model control is on

        # requests waiting in the 300 ms batching window when SIGTERM arrives are answered
        async def burst():
            import tritonclient.grpc.aio as aio

            c = aio.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            try:
                i = aio.InferInput("image", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                calls = [
                    asyncio.ensure_future(c.infer("digits", [i], headers=auth)) for _ in range(4)
                ]
                async with httpx.AsyncClient(headers=auth) as web:  # until all 4 are received

                    async def received() -> bool:
                        text = (await web.get(f"http://127.0.0.1:{http_port}/metrics")).text
                        return _received(text) >= 4 + 1  # + the request above

                    await async_wait_until(
                        received, 30, message="requests never reached the server"
                    )
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)
            finally:
                await c.close()

        answers = asyncio.run(burst())
        for res in answers:
            np.testing.assert_allclose(
                res.as_numpy("probs"), digits_reference(x, 1)["probs"], RTOL, ATOL
            )
        assert proc.wait(30) == 0
        out = proc.stdout.read().decode()
        assert f"127.0.0.1:{grpc_port}" in out and "tok" not in out.split("gRPC")[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_grpc_port_is_a_usage_error(repo_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def start():
            frontend = GrpcFrontend(make_app(repo_dir).state, "127.0.0.1", port)
            await frontend.start()

        with pytest.raises(UsageError, match=f"127.0.0.1:{port}"):
            asyncio.run(start())
