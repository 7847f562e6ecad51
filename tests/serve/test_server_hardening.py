"""Bad input to the HTTP server, as a careless client and as an attacker would send it.

Every case talks to a real uvicorn over a real socket (raw bytes where the
framing itself is the point) and asserts: a 4xx status, a KServe JSON body
``{"error": ...}`` naming the culprit (header, parameter, input, limit), no
traceback in the server's logs, and a server that still answers afterwards.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
from serve_helpers import make_app, metric, running_server
from serve_models import digits_reference, images, infer_json_body, log_model
from support import wait_until

from bnexport.serve.core.logs import JsonLineFormatter, get_logger

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RTOL, ATOL = 1e-4, 1e-5  # float32 model vs float64 NumPy
INFER = "/v2/models/digits/infer"


# -- helpers ----------------------------------------------------------------------------------
def _binary_body(x: np.ndarray, **params) -> tuple[bytes, dict]:
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes, **params},
            }
        ]
    }
    head = json.dumps(header).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def _raw(addr: str, data: bytes, *, timeout: float = 5.0, then: bytes | None = None):
    """Send raw bytes; return ``(status, headers, body, seconds)`` of the response."""
    host, port = addr.split(":")
    start = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if then is not None:
            sock.sendall(then)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed without a response: {buf!r}")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return status, headers, body, time.perf_counter() - start


def _assert_json_error(status: int, body: bytes, want: int, *fragments: str) -> str:
    assert status == want, body
    message = json.loads(body)["error"]
    for fragment in fragments:
        assert fragment in message, message
    return message


def _assert_error(resp: httpx.Response, want: int, *fragments: str) -> str:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    return _assert_json_error(resp.status_code, resp.content, want, *fragments)


def _log_lines(read, predicate) -> list[dict]:
    return [r for r in read() if r["event"] == "request" and predicate(r)]


def _wait_for_log(read, predicate, timeout: float = 5.0) -> dict:
    """The first access-log record matching ``predicate`` (written after the response)."""
    found = wait_until(
        lambda: _log_lines(read, predicate),
        timeout,
        message=lambda: f"no matching access-log record in {read()}",
    )
    return found[0]


@pytest.fixture
def captured_logs():
    """The server's JSON-lines log records written during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    loggers = [get_logger(), logging.getLogger("uvicorn.error")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    records: list[dict] = []

    def read() -> list[dict]:
        records[:] = [json.loads(line) for line in stream.getvalue().splitlines()]
        return records

    yield read
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)
    text = stream.getvalue()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text


@pytest.fixture(scope="module")
def guarded(repo_dir):
    """Token, 1 MiB body limit, 0.5 s header and body timeouts."""
    app = make_app(repo_dir, token=TOKEN, max_body_bytes=1 << 20, body_timeout_s=0.5)
    with running_server(app, header_timeout_s=0.5) as url:
        yield url


def _metrics(url: str) -> str:
    return httpx.get(f"http://{url}/metrics", headers=AUTH).text


def _still_serving(url: str) -> None:
    assert httpx.get(f"http://{url}/v2/health/live").status_code == 200
    x = images(1, 3)
    resp = httpx.post(f"http://{url}{INFER}", json=infer_json_body(x), headers=AUTH)
    assert resp.status_code == 200, resp.text


# -- HTTP framing (raw sockets) ---------------------------------------------------------------
@pytest.mark.parametrize(
    "request_bytes, fragments",
    [
        (b"GARBAGE\r\n\r\n", ["invalid HTTP request"]),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32, ["invalid HTTP request"]),
        (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            ["invalid HTTP request", "Content-Length"],
        ),
        (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            ["invalid HTTP request", "Content-Length"],
        ),
        (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Content-Length: 4\r\n\r\nabcd",
            ["Content-Length"],
        ),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", ["invalid HTTP"]),
    ],
    ids=["garbage-line", "tls-to-http", "cl-text", "cl-negative", "cl-twice", "bad-header"],
)
def test_unparsable_request_is_json_400(guarded, captured_logs, request_bytes, fragments):
    status, headers, body, _ = _raw(guarded, request_bytes)
    _assert_json_error(status, body, 400, *fragments)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    _wait_for_log(captured_logs, lambda r: r.get("status") == 400)
    _still_serving(guarded)


def test_content_length_and_transfer_encoding_rejected_at_once(guarded):
    body = json.dumps(infer_json_body(images(1, 0))).encode()
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    status, headers, resp, seconds = _raw(guarded, head + body)
    _assert_json_error(status, resp, 400, "Content-Length", "Transfer-Encoding")
    assert headers["connection"] == "close"
    assert seconds < 2.0, f"answered after {seconds:.1f} s"
    _still_serving(guarded)


def test_slow_headers_get_408(guarded, captured_logs):
    status, headers, body, seconds = _raw(guarded, b"GET /v2/health/live HTTP/1.1\r\nHo")
    _assert_json_error(status, body, 408, "headers not received within 0.5 s")
    assert headers["connection"] == "close" and seconds < 3.0
    _wait_for_log(captured_logs, lambda r: r.get("status") == 408)


def test_idle_connection_closed_quietly(guarded):
    """A connection that sends nothing is closed at the header timeout, without a 408."""
    host, port = guarded.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        start = time.perf_counter()
        assert sock.recv(1024) == b""
        assert 0.3 < time.perf_counter() - start < 3.0


def test_slow_body_gets_408(guarded, captured_logs):
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    status, headers, body, seconds = _raw(guarded, head + b'{"inputs": [')
    _assert_json_error(status, body, 408, "request body not received within 0.5 s", "12 bytes")
    assert headers["connection"] == "close" and seconds < 3.0
    _wait_for_log(captured_logs, lambda r: r.get("status") == 408 and r.get("path") == INFER)
    _still_serving(guarded)


def test_client_disconnect_mid_body_is_one_499_line(guarded, captured_logs):
    before = httpx.get(f"http://{guarded}/metrics", headers=AUTH).text
    host, port = guarded.split(":")
    path = "/v2/models/digits/versions/2/infer"  # a path no other request of the module uses
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    inflight = {"model": "digits", "version": "2"}
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + b"x" * 5000)
        # the request is being read (counted in flight) before the client goes away
        wait_until(
            lambda: metric(_metrics(guarded), "bnexport_inflight_requests", **inflight, default=0),
            5,
            message="the request never reached the endpoint",
        )
    _wait_for_log(captured_logs, lambda r: r.get("path") == path)
    lines = _log_lines(captured_logs, lambda r: r.get("path") == path)
    assert len(lines) == 1 and lines[0]["status"] == 499, lines
    assert "disconnected" in lines[0]["error"]
    after = _metrics(guarded)
    labels = {"model": "digits", "version": "2", "status": "499"}
    assert metric(after, "bnexport_requests_total", **labels) == (
        metric(before, "bnexport_requests_total", **labels, default=0.0) + 1
    )
    _still_serving(guarded)


# -- auth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "header, status",
    [
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
        (f"BEARER {TOKEN}", 200),
        (f"Bearer {TOKEN}x", 401),
        (f"Basic {TOKEN}", 401),
        (TOKEN, 401),
        ("", 401),
    ],
    ids=["canonical", "lowercase", "upper", "wrong", "basic", "no-scheme", "empty"],
)
def test_bearer_scheme_is_case_insensitive(guarded, header, status):
    resp = httpx.post(
        f"http://{guarded}{INFER}",
        json=infer_json_body(images(1, 0)),
        headers={"Authorization": header},
    )
    if status == 200:
        assert resp.status_code == 200, resp.text
    else:
        _assert_error(resp, 401, "bearer token")
        assert resp.headers["www-authenticate"] == "Bearer"


# -- limits -------------------------------------------------------------------------------------
def test_limits_name_the_limit(guarded):
    url = f"http://{guarded}{INFER}"
    big = b"x" * ((1 << 20) + 1)
    _assert_error(httpx.post(url, content=big, headers=AUTH), 413, "--max-body-mb")
    _assert_error(
        httpx.post(url, content=iter([big[:600000], big[600000:]]), headers=AUTH),
        413,
        "over the limit",
    )
    _assert_error(
        httpx.post(url, content=b"{}", headers={**AUTH, "Content-Encoding": "br"}), 415, "'br'"
    )
    _assert_error(
        httpx.post(url, content=b"not gzip", headers={**AUTH, "Content-Encoding": "gzip"}),
        400,
        "not valid gzip",
    )
    bomb = gzip.compress(b" " * (2 << 20))
    _assert_error(
        httpx.post(url, content=bomb, headers={**AUTH, "Content-Encoding": "gzip"}),
        413,
        "decompressed",
    )
    _still_serving(guarded)


def test_inflight_bound_queues_then_503(repo_dir):
    """One request holds the only slot; the next waits, then gets 503 + Retry-After."""
    app = make_app(repo_dir, max_inflight_requests=1, admission_wait_s=0.3, body_timeout_s=5)
    with running_server(app) as url:
        host, port = url.split(":")
        body = json.dumps(infer_json_body(images(2, 0))).encode()
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection((host, int(port))) as holder:
            holder.sendall(head.encode() + body[:10])  # admitted, body still arriving
            wait_until(lambda: app.admission.requests == 1, 5, message="never admitted")
            resp = httpx.post(f"http://{url}{INFER}", json=infer_json_body(images(1, 0)))
            _assert_error(resp, 503, "server busy", "--max-inflight")
            assert resp.headers["retry-after"] == "1"
            # health and metadata carry no body: never queued
            assert httpx.get(f"http://{url}/v2/health/ready").status_code == 200
            assert httpx.get(f"http://{url}/v2/models/digits").status_code == 200
            holder.sendall(body[10:])
            reply = holder.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        wait_until(lambda: app.admission.requests == 0, 2, message="the slot was never freed")
        assert app.admission.bytes == 0
        assert httpx.post(f"http://{url}{INFER}", json=infer_json_body(images(1, 0))).is_success


# -- KServe parameters and framing ------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"parameters": {"binary_data_output": "false"}}, ["binary_data_output", "boolean"]),
        ({"parameters": {"binary_data_output": 1}}, ["binary_data_output", "boolean"]),
        (
            {"outputs": [{"name": "probs", "parameters": {"binary_data": "true"}}]},
            ["output 'probs'", "binary_data", "boolean"],
        ),
        (
            {"outputs": [{"name": "probs", "parameters": {"classification": 3}}]},
            ["output 'probs'", "classification"],
        ),
        ({"outputs": [{"name": "probs"}, {"name": "probs"}]}, ["output 'probs'", "twice"]),
        ({"outputs": [{"name": "nope"}]}, ["nope"]),
        ({"id": 7}, ["id"]),
    ],
    ids=["bdo-string", "bdo-int", "bd-string", "classification", "dup-output", "no-output", "id"],
)
def test_parameter_types_are_checked(guarded, extra, fragments):
    body = infer_json_body(images(1, 0), **extra)
    resp = httpx.post(f"http://{guarded}{INFER}", json=body, headers=AUTH)
    _assert_error(resp, 400, *fragments)


@pytest.mark.parametrize(
    "mutate, fragments",
    [
        (lambda b, h: (b, {**h, "Inference-Header-Content-Length": "abc"}), ["abc"]),
        (
            lambda b, h: (b, {**h, "Inference-Header-Content-Length": str(len(b) + 1)}),
            ["outside the body"],
        ),
        (lambda b, h: (b[:-4], h), ["input 'image'", "overruns"]),
        (lambda b, h: (b + b"\0" * 4, h), ["4 bytes", "follow"]),
    ],
    ids=["hlen-text", "hlen-too-big", "truncated-tensor", "trailing-bytes"],
)
def test_binary_framing_errors(guarded, mutate, fragments):
    body, headers = mutate(*_binary_body(images(1, 0)))
    resp = httpx.post(f"http://{guarded}{INFER}", content=body, headers={**headers, **AUTH})
    _assert_error(resp, 400, *fragments)


def test_binary_data_size_must_be_an_integer(guarded):
    x = images(1, 0)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 8, 8, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": "256"},
                }
            ]
        }
    ).encode()
    body, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    resp = httpx.post(f"http://{guarded}{INFER}", content=body, headers={**headers, **AUTH})
    _assert_error(resp, 400, "input 'image'", "binary_data_size")


# -- non-finite values: what Triton does -------------------------------------------------------
def test_nan_and_inf_as_triton_writes_them(tmp_path):
    """JSON ``data`` carries NaN/Infinity/-Infinity tokens (Triton's rapidjson flags); binary
    outputs carry the exact IEEE values; NaN/Infinity are accepted in requests."""
    (tmp_path / "log" / "1").mkdir(parents=True)
    onnx.save(log_model(), tmp_path / "log" / "1" / "model.onnx")
    x = np.array([[1.0, 0.0, -1.0, np.inf]], np.float32)
    with running_server(make_app(tmp_path)) as url:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}
        raw = json.dumps(body)[:-3] + ', "data": [1.0, 0.0, -1.0, Infinity]}]}'
        resp = httpx.post(f"http://{url}/v2/models/log/infer", content=raw)
        assert resp.status_code == 200, resp.text
        assert '"data":[0.0,-Infinity,NaN,Infinity]' in resp.text
        got = np.array(resp.json()["outputs"][0]["data"], np.float32)  # Python's json reads them
        with np.errstate(divide="ignore", invalid="ignore"):
            want = np.log(x).ravel()
        np.testing.assert_array_equal(got, want)  # NaN == NaN for assert_array_equal
        body["inputs"][0]["data"] = [1.0, 0.0, -1.0, 2.0]
        body["parameters"] = {"binary_data_output": True}
        resp = httpx.post(f"http://{url}/v2/models/log/infer", json=body)
        hlen = int(resp.headers["inference-header-content-length"])
        tail = np.frombuffer(resp.content[hlen:], "<f4")
        with np.errstate(divide="ignore", invalid="ignore"):
            want = np.log(np.array([1.0, 0.0, -1.0, 2.0], np.float32))
        np.testing.assert_array_equal(tail, want)
        assert np.isnan(tail[2]) and tail[1] == -np.inf


# -- large bodies: helper process and worker threads --------------------------------------------
def test_json_decoded_in_helper_process_matches(repo_dir):
    app = make_app(repo_dir, json_process_min_bytes=1024)
    x = images(16, 7)
    with running_server(app) as url:
        resp = httpx.post(
            f"http://{url}/v2/models/digits/versions/1/infer", json=infer_json_body(x)
        )
        assert resp.status_code == 200, resp.text
        out = {o["name"]: o for o in resp.json()["outputs"]}
        got = np.array(out["probs"]["data"], np.float32).reshape(out["probs"]["shape"])
        np.testing.assert_allclose(got, digits_reference(x, 0)["probs"], rtol=RTOL, atol=ATOL)
        bad = infer_json_body(x)
        bad["inputs"][0]["datatype"] = "FP33"
        resp = httpx.post(f"http://{url}{INFER}", json=bad)
        _assert_error(resp, 400, "input 'image'", "FP33")  # raised in the helper, sent back
        bad["inputs"][0]["datatype"] = "FP32"
        bad["inputs"][0]["shape"] = [16, 8, 8, 2]
        resp = httpx.post(f"http://{url}{INFER}", json=bad)
        _assert_error(resp, 400, "input 'image'")
        app.state.decoder._kill()  # a helper that died is replaced by the next large body
        resp = httpx.post(
            f"http://{url}/v2/models/digits/versions/1/infer", json=infer_json_body(x)
        )
        assert resp.status_code == 200, resp.text
    assert app.state.decoder._proc is None  # stopped with the server


def test_json_over_its_limit_is_413_before_any_parse(repo_dir):
    """JSON has a size limit of its own (a parse peaks near 20x the body); binary does not."""
    app = make_app(repo_dir, json_process_min_bytes=1024, json_max_bytes=8192)
    x = images(16, 7)  # ~11 KB as JSON, 4 KiB of binary tensor data
    with running_server(app) as url:
        resp = httpx.post(f"http://{url}{INFER}", json=infer_json_body(x))
        _assert_error(resp, 413, "JSON request body", "8192 bytes", "binary")
        assert app.state.decoder._proc is None  # never handed to the helper process
        # the JSON header of a binary body counts too: all JSON, declared as a header
        raw = json.dumps(infer_json_body(x)).encode()
        headers = {"Inference-Header-Content-Length": str(len(raw))}
        resp = httpx.post(f"http://{url}{INFER}", content=raw, headers=headers)
        _assert_error(resp, 413, "JSON request body")
        body, headers = _binary_body(x)  # the same tensor as binary data: served
        resp = httpx.post(f"http://{url}/v2/models/digits/versions/1/infer", content=body,
                          headers=headers)  # fmt: skip
        assert resp.status_code == 200, resp.text
        out = {o["name"]: o for o in resp.json()["outputs"]}
        got = np.array(out["probs"]["data"], np.float32).reshape(out["probs"]["shape"])
        np.testing.assert_allclose(got, digits_reference(x, 0)["probs"], rtol=RTOL, atol=ATOL)
        small = httpx.post(f"http://{url}/v2/models/digits/versions/1/infer",
                           json=infer_json_body(x[:4]))  # fmt: skip
        assert small.status_code == 200, small.text  # ~3 KB of JSON: under the limit


def test_decode_process_refuses_json_over_its_limit_without_starting():
    from bnexport.serve.protocol.errors import PayloadTooLargeError
    from bnexport.serve.rest.decode_process import DecodeProcess

    decoder = DecodeProcess(min_bytes=16, max_bytes=100)
    with pytest.raises(PayloadTooLargeError, match="101 bytes is over the limit of 100"):
        decoder.decode_blocking(b" " * 101, None)
    assert decoder._proc is None


def test_large_response_sent_in_slices_matches(repo_dir):
    """8192 rows: decoded in a thread, run off the loop, JSON encoded in slices, sent in slices."""
    x = images(8192, 11)
    body, headers = _binary_body(x)
    with running_server(make_app(repo_dir, max_body_bytes=8 << 20)) as url:
        resp = httpx.post(
            f"http://{url}/v2/models/digits/versions/1/infer", content=body, headers=headers
        )
    assert resp.status_code == 200 and int(resp.headers["content-length"]) == len(resp.content)
    out = {o["name"]: o for o in resp.json()["outputs"]}
    got = np.array(out["logits"]["data"], np.float32).reshape(8192, 10)
    np.testing.assert_allclose(got, digits_reference(x, 0)["logits"], rtol=RTOL, atol=ATOL)


# -- bind errors and the printed example ---------------------------------------------------------
def test_listen_errors_name_host_and_port():
    from bnexport.serve.protocol.errors import ListenError
    from bnexport.serve.server import listen_socket

    taken = listen_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}.*in use"):
            listen_socket("127.0.0.1", port)
    finally:
        taken.close()
    with pytest.raises(ListenError, match="--host 'no-such-host.invalid'"):
        listen_socket("no-such-host.invalid", 0)
    with pytest.raises(ListenError, match="192.0.2.1 is not an address of this machine"):
        listen_socket("192.0.2.1", 0)  # TEST-NET-1: never local


def test_serve_model_fails_before_printing_on_busy_port(repo_dir):
    from bnexport.serve.protocol.errors import ListenError
    from bnexport.serve.server import listen_socket, serve_model
    from bnexport.serve.settings import ServeSettings

    taken = listen_socket("127.0.0.1", 0)
    printed: list[str] = []
    try:
        with pytest.raises(ListenError, match="in use"):
            serve_model(
                repo_dir,
                ServeSettings(port=taken.getsockname()[1]),
                print_fn=printed.append,
            )
    finally:
        taken.close()
    assert printed == []


def test_curl_example_never_shows_the_token(repo_dir):
    from bnexport.serve.core.repository import ModelRepository
    from bnexport.serve.server import TOKEN_ENV, curl_example

    model = ModelRepository.from_path(repo_dir).get("digits")
    line = curl_example(model, "127.0.0.1", 8000, TOKEN)
    assert TOKEN not in line and f'"Authorization: Bearer ${TOKEN_ENV}"' in line


def test_concurrent_health_while_json_body_streams(guarded):
    """A slow upload holds no event-loop time: health answers while it trickles in."""
    host, port = guarded.split(":")
    done = threading.Event()

    def trickle():
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Length: 100\r\n\r\n".encode()
            )
            done.wait(2)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        for _ in range(5):
            start = time.perf_counter()
            assert httpx.get(f"http://{guarded}/v2/health/live").status_code == 200
            assert time.perf_counter() - start < 1.0
    finally:
        done.set()
        t.join()


# -- health latency while the largest allowed request is processed -------------------------------
_SERVER_SCRIPT = """
import sys
from bnexport.serve.server import serve_model
from bnexport.serve.settings import ServeSettings
serve_model(sys.argv[1], ServeSettings(port=0, max_body_mb=float(sys.argv[2]), log_level="warning"),
            print_fn=lambda line: print(line, flush=True))
"""


def _largest_body(kind: str, limit: int) -> tuple[bytes, dict]:
    """An infer body for digits as close to ``limit`` bytes as the format allows."""
    if kind == "binary":
        rows = (limit - 4096) // 256
        return _binary_body(np.full((rows, 8, 8, 1), 0.5, np.float32))
    head = b'{"inputs":[{"name":"image","shape":[%d,8,8,1],"datatype":"FP32","data":['
    rows = (limit - 200) // (64 * 4)
    data = b"0.5," * (rows * 64 - 1) + b"0.5"
    return (head % rows) + data + b"]}]}", {}


_SENDER_SCRIPT = """
import json, sys, httpx
body = open(sys.argv[2], "rb").read()
resp = httpx.post(sys.argv[1], content=body, headers=json.loads(sys.argv[3]), timeout=300)
print(resp.status_code)
"""


def _probe(client: httpx.Client, url: str, until) -> np.ndarray:
    """Latencies (ms) of /v2/health/live and /ready, alternately, every 5 ms until ``until()``."""
    latencies: list[float] = []
    paths = ["/v2/health/live", "/v2/health/ready"]
    while not until():
        start = time.perf_counter()
        resp = client.get(f"{url}{paths[len(latencies) % 2]}")
        latencies.append((time.perf_counter() - start) * 1000)
        assert resp.status_code == 200
        time.sleep(0.005)
    return np.array(latencies)


def _health_while(url: str, body_file, headers: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """Status of the large request (sent by another process, so that its bytes cost this
    process no GIL), the health latencies (ms) meanwhile, and those of the second before."""
    import subprocess
    import sys

    with httpx.Client(timeout=10) as client:
        client.get(f"{url}/v2/health/live")  # connection open before the clock starts
        t_end = time.monotonic() + 1.0
        idle = _probe(client, url, lambda: time.monotonic() > t_end)
        sender = subprocess.Popen(
            [sys.executable, "-c", _SENDER_SCRIPT, f"{url}{INFER}", str(body_file)]
            + [json.dumps(headers)],
            stdout=subprocess.PIPE,
            text=True,
        )
        busy = _probe(client, url, lambda: sender.poll() is not None)
        status = sender.communicate()[0].strip()
    return status, busy, idle


@pytest.mark.parametrize(
    "kind, limit_mb",
    [
        ("binary", 64),
        ("json", 16),
        pytest.param("json", 64, marks=pytest.mark.slow),
    ],
)
def test_health_p99_under_50ms_while_largest_request_runs(repo_dir, tmp_path, kind, limit_mb):
    """/v2/health/* answer in < 50 ms (p99) while a body of the full limit is decoded and run.

    The server runs in its own process, with the defaults of ``bnexport serve``; the
    large request comes from a third process. The bound is 50 ms above the p99 of the
    same probes in the second before the request (the machine's own noise: ~2 ms when
    it is quiet, tens of ms on a loaded shared runner). Up to three attempts: a stall
    the server causes repeats on every attempt, a noisy neighbour does not.
    """
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_SCRIPT, str(repo_dir), str(limit_mb)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("Serving"), line
        url = line.split(" on ")[1].split()[0]
        body, headers = _largest_body(kind, limit_mb << 20)
        assert (limit_mb << 20) - len(body) < 8192
        body_file = tmp_path / "body.bin"
        body_file.write_bytes(body)
        del body
        attempts = []
        for _ in range(3):
            status, busy, idle = _health_while(url, body_file, headers)
            assert status == "200", status
            p99, floor = float(np.percentile(busy, 99)), float(np.percentile(idle, 99))
            attempts.append(
                f"p99 {p99:.1f} ms (max {busy.max():.1f}, {len(busy)} probes) while busy, "
                f"{floor:.1f} ms idle"
            )
            print(f"{kind} {limit_mb} MiB: {attempts[-1]}")
            if p99 < 50 + floor and len(busy) >= 20:
                break
        else:
            raise AssertionError("health stalled behind a large request: " + "; ".join(attempts))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_busy_port_is_one_line_and_prints_nothing(repo_dir):
    import subprocess
    import sys

    from bnexport.serve.server import listen_socket

    taken = listen_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        code = "import sys; from bnexport.cli.main import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.run(
            [sys.executable, "-c", code, "serve", str(repo_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        taken.close()
    assert proc.returncode == 2 and proc.stdout == ""  # unusable --port
    assert proc.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "in use" in proc.stderr and "Traceback" not in proc.stderr
