"""bnexport's server as Ray Serve replicas, end to end on loopback (needs ``bnexport[ray]``).

Slow (each test starts a private Ray, ~10-20 s): 2 replicas answer tritonclient over HTTP
and gRPC through Ray's proxies with ``Session.run``'s numbers; a redeploy to 1 replica
under 4 clients loses no request; ``/metrics`` through the proxy holds both replicas'
samples; SIGTERM to ``bnexport serve --replicas`` drains and leaves no Ray process (the
token holds on both proxies); a model that cannot load fails the start with one line.

Ray processes are found by an environment variable this test sets before Ray starts
(every Ray process inherits the driver's environment), so other Ray instances on the
machine are not counted.

Tolerances (float32): against ``Session.run`` on the same rows, rtol 0 / atol 1e-6
(same onnxruntime kernels; a request merged into a larger batch may sum in another
order); against the float64 NumPy reference, rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.needs("ray_serve", unverified="Ray Serve replicas (serve --replicas)")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from serve_models import digits_cnn, digits_reference, images  # noqa: E402
from support import wait_until  # noqa: E402
from support.servers import free_port  # noqa: E402

import bnexport  # noqa: E402
from bnexport.serve.ray import RayServer, ReplicaOptions, ReplicaStartError  # noqa: E402
from bnexport.serve.settings import ServeSettings  # noqa: E402

MARKER = "BNEXPORT_RAY_TEST_MARKER"
SESSION_ATOL = 1e-6
REF_RTOL, REF_ATOL = 1e-4, 1e-5


def _marked_processes(marker: str) -> list[str]:
    """``pid cmdline`` of live processes (not this one) whose environment has ``marker``."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, not yet reaped by its parent
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid} {cmdline[:120]}")
        except OSError:
            continue
    return found


def _wait_no_ray_left(marker: str, timeout_s: float = 60.0) -> None:
    wait_until(
        lambda: not _marked_processes(marker),
        timeout_s,
        interval=0.25,
        message=lambda: f"Ray processes left after stop: {_marked_processes(marker)}",
    )


@pytest.fixture()
def marker(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    return value


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "digits.onnx"
    onnx.save(digits_cnn(0), path)
    return path


def _http_infer(client, x: np.ndarray) -> np.ndarray:
    infer_input = httpclient.InferInput("image", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    return client.infer("digits", [infer_input]).as_numpy("logits")


def _grpc_infer(client, x: np.ndarray) -> np.ndarray:
    infer_input = grpcclient.InferInput("image", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    return client.infer("digits", [infer_input]).as_numpy("logits")


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications["bnexport"]
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def _listen_addresses(port: int) -> set[str]:
    """Addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def _check_metrics_of_both_replicas(url: str, answered: int) -> None:
    """``/metrics`` through the proxy holds every replica's samples, labelled by replica."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    per_replica: dict[str, float] = {}

    def both_counted() -> bool:
        per_replica.clear()
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "bnexport_requests_total" and labels.get("status") == "200":
                    replica = labels["replica"]
                    per_replica[replica] = per_replica.get(replica, 0) + sample.value
        return sum(per_replica.values()) == answered and len(per_replica) == 2

    wait_until(  # the board is refreshed every second
        both_counted,
        15,
        interval=0.3,
        message=lambda: f"requests per replica in /metrics: {per_replica}",
    )


@pytest.mark.slow
def test_two_replicas_serve_http_and_grpc_and_scale_down_under_load(digits_onnx, marker):
    settings = ServeSettings(
        port=free_port(), grpc_port=free_port(), max_batch=8, log_level="warning"
    )
    server = RayServer(digits_onnx, settings, ReplicaOptions(replicas=2))
    server.start()
    try:
        assert _running_replicas() == 2
        assert len(_marked_processes(marker)) >= 4  # the check below sees Ray's processes
        assert _listen_addresses(settings.port) == {"0100007F"}  # HTTP proxy: 127.0.0.1 only
        x = images(5, seed=3)
        expected = bnexport.Session(str(digits_onnx)).run({"image": x})["logits"]
        np.testing.assert_allclose(
            expected, digits_reference(x)["logits"], rtol=REF_RTOL, atol=REF_ATOL
        )
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        grpc_client = grpcclient.InferenceServerClient(server.grpc_address)
        assert http.is_server_ready() and grpc_client.is_server_ready()
        for _ in range(4):  # the proxies spread requests: both replicas answer
            np.testing.assert_allclose(_http_infer(http, x), expected, rtol=0, atol=SESSION_ATOL)
            np.testing.assert_allclose(
                _grpc_infer(grpc_client, x), expected, rtol=0, atol=SESSION_ATOL
            )
        with pytest.raises(Exception, match="NOT_FOUND|unknown model"):
            grpc_client.get_model_metadata("no_such_model")
        for _ in range(12):
            _http_infer(http, x)
        _check_metrics_of_both_replicas(server.url, answered=4 + 4 + 12)

        # 4 clients (2 HTTP, 2 gRPC) keep sending while the deployment goes 2 -> 1
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        failures: list[str] = []
        lock = threading.Lock()

        address = server.url.removeprefix("http://")

        def client(kind: str, seed: int) -> None:
            rows = images(2, seed=seed)
            want = bnexport.Session(str(digits_onnx)).run({"image": rows})["logits"]
            if kind == "http":
                c, infer = httpclient.InferenceServerClient(address), _http_infer
            else:
                c, infer = grpcclient.InferenceServerClient(server.grpc_address), _grpc_infer
            deadline = time.monotonic() + 120  # bounded even if the main thread fails
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    got = infer(c, rows)
                    ok = np.allclose(got, want, rtol=0, atol=SESSION_ATOL)
                    error = None if ok else "wrong numbers"
                except Exception as exc:  # noqa: BLE001 - counted, reported below
                    ok, error = False, f"{kind}: {exc}"
                with lock:
                    counts["ok" if ok else "failed"] += 1
                    if error and len(failures) < 5:
                        failures.append(error)

        threads = [
            threading.Thread(target=client, args=(kind, seed), daemon=True)
            for seed, kind in enumerate(("http", "http", "grpc", "grpc"))
        ]
        for t in threads:
            t.start()
        # load is flowing before the redeploy ...
        wait_until(lambda: counts["ok"] >= 12, 60, message=lambda: f"no load: {counts}")
        server.deploy(1)
        wait_until(lambda: _running_replicas() == 1, 60, interval=0.2, message="still 2 replicas")
        after = counts["ok"]  # ... and keeps flowing after it
        wait_until(lambda: counts["ok"] >= after + 12, 60, message=lambda: f"stalled: {counts}")
        stop.set()
        for t in threads:
            t.join(30)
        assert counts["failed"] == 0, failures
        assert counts["ok"] > 20, counts
    finally:
        server.stop()
    _wait_no_ray_left(marker)


@pytest.mark.slow
def test_cli_replicas_drain_on_sigterm_and_leave_no_ray(digits_onnx, marker, tmp_path):
    """The token holds through both proxies; SIGTERM exits 0 and no Ray process is left."""
    port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "bnexport", "serve", str(digits_onnx), "--replicas", "2",
        "--port", str(port), "--grpc-port", str(grpc_port), "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "BNEXPORT_SERVE_TOKEN": "s3cret"}
    stderr = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: Ray logs cannot fill it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        banner: list[str] = []
        threading.Thread(target=lambda: banner.extend(proc.stdout), daemon=True).start()
        wait_until(
            lambda: any(line.startswith("Try:") for line in banner) or proc.poll() is not None,
            180,
            interval=0.1,
            message=lambda: f"no banner: {banner}",
        )
        assert banner and banner[0].startswith("Serving digits on http://127.0.0.1:"), (
            banner,
            proc.poll(),
        )
        assert "2 Ray Serve replicas" in banner[0]
        x = images(3, seed=7)
        want = digits_reference(x)["logits"]
        auth = {"authorization": "Bearer s3cret"}  # gRPC metadata keys are lower case
        http = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        infer_input = grpcclient.InferInput("image", list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x)
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            grpc_client.infer("digits", [infer_input])
        with pytest.raises(Exception, match="token"):
            _http_infer(http, x)
        got = grpc_client.infer("digits", [infer_input], headers=auth).as_numpy("logits")
        np.testing.assert_allclose(got, want, rtol=REF_RTOL, atol=REF_ATOL)
        http_input = httpclient.InferInput("image", list(x.shape), "FP32")
        http_input.set_data_from_numpy(x)
        got = http.infer("digits", [http_input], headers=auth).as_numpy("logits")
        np.testing.assert_allclose(got, want, rtol=REF_RTOL, atol=REF_ATOL)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        stderr.seek(0)
        assert code == 0, stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    _wait_no_ray_left(marker)


@pytest.mark.slow
def test_a_replica_that_cannot_load_fails_the_start_with_one_line(tmp_path, marker):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    server = RayServer(
        bad, ServeSettings(port=free_port(), log_level="warning"), ReplicaOptions(replicas=2)
    )
    with pytest.raises(ReplicaStartError) as info:
        server.start()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("bnexport replica could not load its model:"), message
    assert "broken.onnx" in message
    _wait_no_ray_left(marker)
