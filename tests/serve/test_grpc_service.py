"""KServe v2 over gRPC against an unmodified ``tritonclient.grpc`` client, over loopback.

The server is HTTP and gRPC together, as ``bnexport serve --grpc-port`` runs it.
Numbers are compared with ``Session.run`` in this process on the same input
(bit for bit: onnxruntime on CPU computes each sample independently of the
batch it is in) and with the float64 NumPy reference of the model (float32
tolerances rtol=1e-4, atol=1e-5: a 256-term dot product).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_helpers import running_servers
from serve_helpers import make_app, metric
from serve_models import digits_reference, images
from support import wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bnexport.runtime.session import Session

RTOL, ATOL = 1e-4, 1e-5
TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def servers(repo_dir):
    """digits v1/v2 + gather over HTTP and gRPC, token required, 1 MiB message limit."""
    app = make_app(repo_dir, token=TOKEN, max_body_bytes=1 << 20)
    with running_servers(app, token=TOKEN) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    c = grpcclient.InferenceServerClient(servers.grpc)
    yield c
    c.close()


def _input(x: np.ndarray, name: str = "image", datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _code(excinfo) -> str:
    return str(excinfo.value.status())


def test_health_metadata_config(client):
    assert client.is_server_live()  # health needs no token
    assert client.is_server_ready()
    meta = client.get_server_metadata(headers=AUTH, as_json=True)
    assert meta["name"] == "bnexport"
    assert {"statistics", "model_repository"} <= set(meta["extensions"])
    model = client.get_model_metadata("digits", headers=AUTH, as_json=True)
    assert model["versions"] == ["1", "2"]
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": ["-1", "8", "8", "1"]}
    ]
    assert [o["name"] for o in model["outputs"]] == ["logits", "probs"]
    assert client.get_model_metadata("digits", "1", headers=AUTH, as_json=True)["versions"] == ["1"]
    assert client.is_model_ready("digits", headers=AUTH)
    assert client.is_model_ready("digits", "2", headers=AUTH)
    assert not client.is_model_ready("digits", "7", headers=AUTH)
    assert not client.is_model_ready("nope", headers=AUTH)
    config = client.get_model_config("digits", headers=AUTH, as_json=True)["config"]
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == ["8", "8", "1"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"


@pytest.mark.parametrize("version", ["", "1"])
def test_model_config_is_one_message_on_both_transports(servers, client, version):
    """HTTP's config JSON is gRPC's ``ModelConfig`` message, as Triton writes it."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    grpc_config = client.get_model_config("digits", version, headers=AUTH).config
    path = "/v2/models/digits" + (f"/versions/{version}" if version else "") + "/config"
    resp = httpx.get(f"http://{servers.http}{path}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert json_format.ParseDict(body, model_config_pb2.ModelConfig()) == grpc_config
    # Triton's JSON: proto field names, 64-bit integers as numbers, defaults printed
    assert body["name"] == "digits" and body["platform"] == "onnxruntime_onnx"
    assert body["max_batch_size"] == 32
    assert body["input"] == [
        {
            "name": "image",
            "data_type": "TYPE_FP32",
            "format": "FORMAT_NONE",
            "dims": [8, 8, 1],
            "is_shape_tensor": False,
            "allow_ragged_batch": False,
            "optional": False,
            "is_non_linear_format_io": False,
        }
    ]
    assert [(o["name"], o["dims"]) for o in body["output"]] == [("logits", [10]), ("probs", [10])]
    assert body["dynamic_batching"]["max_queue_delay_microseconds"] == 10_000  # 10 ms window
    assert body["instance_group"] == []


def test_infer_raw_matches_session_and_numpy(client, repo_dir):
    x = images(5, seed=3)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("probs", "logits")]
    result = client.infer(
        "digits", [_input(x)], model_version="1", outputs=outputs, request_id="r-7", headers=AUTH
    )
    response = result.get_response()
    assert response.model_name == "digits" and response.model_version == "1"
    assert response.id == "r-7"
    assert [o.name for o in response.outputs] == ["probs", "logits"]
    local = Session(str(repo_dir / "digits" / "1" / "model.onnx")).run({"image": x})
    ref = digits_reference(x, seed=0)
    for name in ("logits", "probs"):
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == (5, 10)
        np.testing.assert_array_equal(got, local[name])
        np.testing.assert_allclose(got, ref[name], rtol=RTOL, atol=ATOL)


def test_infer_typed_contents_matches_session(servers, repo_dir):
    """Typed ``contents`` (fp32_contents, int64_contents) instead of raw bytes."""
    x = images(2, seed=4)
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="2")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(servers.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=list(AUTH.items()))
        gather = service_pb2.ModelInferRequest(model_name="gather")
        data = np.arange(8, dtype=np.float32).reshape(2, 4)
        t = gather.inputs.add(name="data", datatype="FP32", shape=[2, 4])
        t.contents.fp32_contents.extend(data.reshape(-1).tolist())
        t = gather.inputs.add(name="idx", datatype="INT64", shape=[2, 1])
        t.contents.int64_contents.extend([3, -4])
        gathered = stub.ModelInfer(gather, metadata=list(AUTH.items()))
    local = Session(str(repo_dir / "digits" / "2" / "model.onnx")).run({"image": x})
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    for name in ("logits", "probs"):
        out = response.outputs[outputs[name]]
        assert out.datatype == "FP32" and list(out.shape) == [2, 10]
        got = np.frombuffer(response.raw_output_contents[outputs[name]], "<f4").reshape(2, 10)
        np.testing.assert_array_equal(got, local[name])
    got = np.frombuffer(gathered.raw_output_contents[0], "<f4").reshape(2, 1)
    np.testing.assert_array_equal(got, [[3.0], [4.0]])  # data[0, 3], data[1, -4 -> 0]


def test_async_infer_under_concurrency_is_batched_and_exact(servers, repo_dir):
    """64 requests from 32 concurrent aio clients: each answer is its own, batches merge."""
    local = Session(str(repo_dir / "digits" / "2" / "model.onnx"))
    xs = [images(1 + i % 3, seed=100 + i) for i in range(64)]

    async def main():
        client = aioclient.InferenceServerClient(servers.grpc)
        try:
            before = await client.get_inference_statistics("digits", "2", headers=AUTH)
            sem = asyncio.Semaphore(32)

            async def one(x):
                async with sem:
                    inp = aioclient.InferInput("image", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    res = await client.infer("digits", [inp], headers=AUTH)
                    return res.as_numpy("probs")

            got = await asyncio.gather(*(one(x) for x in xs))
            after = await client.get_inference_statistics("digits", "2", headers=AUTH)
            return got, before.model_stats[0], after.model_stats[0]
        finally:
            await client.close()

    # Merging is timing-dependent (a gRPC request arrives whole, so the batcher only merges
    # what queues while a run is busy): on a loaded machine one burst may run unmerged, so
    # up to three bursts; a batcher that never merges fails all three.
    merged_runs = []
    for _ in range(3):
        got, before, after = asyncio.run(main())
        for x, probs in zip(xs, got, strict=True):
            np.testing.assert_array_equal(probs, local.run({"image": x})["probs"])
        rows = sum(len(x) for x in xs)
        assert after.inference_count - before.inference_count == rows
        ok = after.inference_stats.success.count - before.inference_stats.success.count
        assert ok == len(xs)
        runs = after.execution_count - before.execution_count
        assert 1 <= runs <= len(xs)
        merged_runs.append(runs)
        if runs < len(xs):
            break
    assert min(merged_runs) < len(xs), f"requests never merged into one run: {merged_runs}"


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: ("nope", [_input(images(1, 0))]), "NOT_FOUND", "unknown model 'nope'"),
        (
            lambda: ("digits", [_input(images(1, 0), name="img")]),
            "INVALID_ARGUMENT",
            "unknown input",
        ),
        (lambda: ("digits", []), "INVALID_ARGUMENT", "missing input"),
        (
            lambda: ("digits", [_input(np.zeros((1, 8, 8, 2), np.float32))]),
            "INVALID_ARGUMENT",
            "dimension 3 must be 1",
        ),
        (
            lambda: ("digits", [_input(np.zeros((1, 8, 8, 1)), datatype="FP64")]),
            "INVALID_ARGUMENT",
            "expects float32",
        ),
        (
            lambda: ("digits", [_input(images(300, 0))]),  # a larger, valid request
            None,
            None,
        ),
    ],
    ids=["unknown_model", "unknown_input", "missing_input", "bad_shape", "bad_dtype", "ok_large"],
)
def test_bad_requests_get_status_codes(client, make, code, words):
    model, inputs = make()
    if code is None:
        assert client.infer(model, inputs, headers=AUTH).as_numpy("probs").shape == (300, 10)
        return
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(model, inputs, headers=AUTH)
    assert _code(excinfo) == f"StatusCode.{code}"
    assert words in excinfo.value.message()


def test_raw_contents_framing_errors(servers):
    """Raw bytes that do not match the shape, raw and typed mixed, unknown datatype."""
    with grpc.insecure_channel(servers.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        md = list(AUTH.items())

        def call(build):
            request = service_pb2.ModelInferRequest(model_name="digits")
            build(request)
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(request, metadata=md)
            assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return excinfo.value.details()

        def short_raw(r):
            r.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 1])
            r.raw_input_contents.append(b"\0" * 10)

        assert "10 raw bytes" in call(short_raw)

        def mixed(r):
            t = r.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 1])
            t.contents.fp32_contents.extend([0.0] * 64)
            r.raw_input_contents.append(b"\0" * 256)

        assert "use one" in call(mixed)

        def bad_datatype(r):
            r.inputs.add(name="image", datatype="FP8", shape=[1])
            r.raw_input_contents.append(b"\0")

        assert "unsupported datatype" in call(bad_datatype)

        def wrong_field(r):
            t = r.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 1])
            t.contents.int_contents.extend([0] * 64)

        assert "fp32_contents" in call(wrong_field)


def test_message_over_limit_is_resource_exhausted(client):
    x = np.zeros((5000, 8, 8, 1), np.float32)  # 1.28 MB > the 1 MiB limit
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("digits", [_input(x)], headers=AUTH)
    assert _code(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"


def test_model_failure_is_internal_and_only_for_that_request(client):
    data = np.zeros((1, 4), np.float32)
    bad = [_input(data, "data"), _input(np.array([[9]], np.int64), "idx", "INT64")]
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("gather", bad, headers=AUTH)
    assert _code(excinfo) == "StatusCode.INTERNAL"
    assert "gather" in excinfo.value.message()
    good = [_input(data + 1, "data"), _input(np.array([[0]], np.int64), "idx", "INT64")]
    np.testing.assert_array_equal(client.infer("gather", good, headers=AUTH).as_numpy("out"), [[1]])


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({}, False),
        ({"authorization": "Bearer wrong"}, False),
        ({"authorization": TOKEN}, False),
        ({"authorization": f"bearer {TOKEN}"}, True),
        ({"authorization": f"BEARER  {TOKEN} "}, True),  # gRPC metadata keys are lowercase
    ],
    ids=["none", "wrong", "no_scheme", "lowercase", "uppercase"],
)
def test_auth(client, headers, ok):
    x = images(1, 0)
    if ok:
        assert client.infer("digits", [_input(x)], headers=headers).as_numpy("probs").shape == (
            1,
            10,
        )
        assert client.get_model_metadata("digits", headers=headers).name == "digits"
        return
    for call in (
        lambda: client.infer("digits", [_input(x)], headers=headers),
        lambda: client.get_model_metadata("digits", headers=headers),
        lambda: client.get_inference_statistics("digits", headers=headers),
    ):
        with pytest.raises(InferenceServerException) as excinfo:
            call()
        assert _code(excinfo) == "StatusCode.UNAUTHENTICATED"
    assert client.is_server_live(headers=headers)  # health stays open


def test_stream_infer_answers_every_request(client, repo_dir):
    local = Session(str(repo_dir / "digits" / "2" / "model.onnx"))
    xs = [images(2, seed=200 + i) for i in range(6)]
    results: dict[str, np.ndarray] = {}
    errors: list = []
    done = concurrent.futures.Future()

    def callback(result, error):
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result.as_numpy("probs")
        if len(results) + len(errors) == len(xs) + 1 and not done.done():
            done.set_result(None)

    client.start_stream(callback, headers=AUTH)
    try:
        for i, x in enumerate(xs):
            client.async_stream_infer("digits", [_input(x)], request_id=str(i))
        client.async_stream_infer("nope", [_input(xs[0])], request_id="bad")
        done.result(timeout=30)
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "unknown model 'nope'" in str(errors[0])
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(results[str(i)], local.run({"image": x})["probs"])


def test_grpc_requests_in_http_metrics(servers, client):
    http = httpx.Client(base_url=f"http://{servers.http}", headers=AUTH)
    ok = {"model": "digits", "version": "2", "status": "200"}
    rpc_ok = {"rpc": "ModelInfer", "code": "OK"}
    rpc_missing = {"rpc": "ModelInfer", "code": "NOT_FOUND"}
    text = http.get("/metrics").text
    before = metric(text, "bnexport_requests_total", ok, default=0.0)
    rpc_ok_before = metric(text, "bnexport_grpc_requests_total", rpc_ok, default=0.0)
    missing_before = metric(text, "bnexport_grpc_requests_total", rpc_missing, default=0.0)
    client.infer("digits", [_input(images(1, 0))], headers=AUTH)
    with pytest.raises(InferenceServerException):
        client.infer("no_such_model", [_input(images(1, 0))], headers=AUTH)
    text = http.get("/metrics").text
    assert metric(text, "bnexport_requests_total", ok) == before + 1
    assert metric(text, "bnexport_grpc_requests_total", rpc_ok) == rpc_ok_before + 1

    # an aborted RPC is counted just after its status went out: wait for the count
    def missing_counted() -> bool:
        text = http.get("/metrics").text
        count = metric(text, "bnexport_grpc_requests_total", rpc_missing, default=0.0)
        return count == missing_before + 1

    wait_until(missing_counted, 10, message="the NOT_FOUND call was never counted")
    labels = {"model": "unknown", "version": "", "status": "404"}
    assert metric(text, "bnexport_requests_total", labels) >= 1  # counted as HTTP would


def _received(text: str) -> float:
    """Requests for digits v2 being handled or answered (Prometheus text)."""
    labels = {"model": "digits", "version": "2"}
    done = metric(text, "bnexport_requests_total", labels, status="200", default=0.0)
    return done + metric(text, "bnexport_inflight_requests", labels, default=0.0)


def _wait_received(metrics, n: int, timeout_s: float = 30.0) -> None:
    wait_until(
        lambda: _received(metrics.render().decode()) >= n,
        timeout_s,
        message="the requests never reached the server",
    )


def test_shutdown_drains_grpc_requests_in_flight(repo_dir):
    """SIGTERM with requests in flight: every one is answered, then new calls are refused."""
    # a long window keeps the requests queued in the batcher when SIGTERM arrives
    app = make_app(repo_dir, batch_timeout_ms=200.0, batch_policy="window")
    with running_servers(app) as s:
        client = grpcclient.InferenceServerClient(s.grpc)
        xs = [images(1, seed=300 + i) for i in range(8)]
        pending = []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for x in xs:
                pending.append(pool.submit(client.infer, "digits", [_input(x)]))
            _wait_received(app.state.metrics, len(xs))  # in flight or answered, none refused
            s.sigterm()
            answers = [f.result(timeout=30) for f in pending]
        ref = [digits_reference(x, seed=1)["probs"] for x in xs]
        for res, r in zip(answers, ref, strict=True):
            np.testing.assert_allclose(res.as_numpy("probs"), r, rtol=RTOL, atol=ATOL)
        s.thread.join(timeout=30)
        assert not s.thread.is_alive()
        with pytest.raises(InferenceServerException) as excinfo:
            client.is_server_live(client_timeout=2)
        assert "UNAVAILABLE" in _code(excinfo) or "DEADLINE" in _code(excinfo)
        client.close()
