"""Tables of bad inference requests and of the server's bounds, each sent over HTTP and gRPC.

Both transports share one data plane (the codecs' shape check in
:mod:`bnexport.serve.protocol.tensor_limits`, the model's input check, the repository
lookup), so each bad request must end with the same status family on both
(400 / INVALID_ARGUMENT, 404 / NOT_FOUND), a message that names the field at
fault, and, where both transports describe the request alike, the same message.

HTTP requests are JSON bodies sent with ``httpx``; gRPC requests are
``ModelInferRequest`` messages built from ``tritonclient.grpc``'s own protobuf
classes (``tritonclient.grpc.InferInput`` refuses shapes that do not match its
data, which is the point of several rows) with every tensor in
``raw_input_contents``.

The second table holds the server's bounds (body / message size, token, in-flight
bound, the deadline of a stuck request): one server per row, one request over each
transport, and afterwards one that must be answered, right (every slot came back).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import struct
import threading
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_helpers import running_servers
from serve_helpers import hold_model_runs, make_app
from serve_models import digits_reference, images
from support import wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bnexport.serve.protocol.tensor_limits import MAX_RANK

IMAGE = [1, 8, 8, 1]
ZEROS = np.zeros(64, np.float32)
RTOL, ATOL = 1e-4, 1e-5  # float32 model vs float64 NumPy reference (256-term dot products)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One request input: its wire datatype and shape, and its flat values."""

    name: str
    datatype: str
    shape: list[int]
    values: Any  # flat np.ndarray, or a list of bytes for BYTES

    def json(self) -> dict:
        if self.datatype == "BYTES":
            data = [v.decode() for v in self.values]
        else:
            data = np.asarray(self.values).tolist()
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape, "data": data}

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(v)) + v for v in self.values)
        return np.ascontiguousarray(self.values).tobytes()


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad request and what both transports must answer."""

    id: str
    inputs: list[Tensor]
    status: int  # HTTP status; the gRPC code follows from it
    words: tuple[str, ...]  # in the message of both transports (the field at fault)
    model: str = "digits"
    version: str = ""
    outputs: tuple[str, ...] = ()
    same_text: bool = True  # both transports describe the request alike


def image(shape=IMAGE, values=ZEROS, datatype="FP32", name="image") -> Tensor:
    return Tensor(name, datatype, list(shape), values)


F32 = np.float32
# fmt: off
CASES = [
    # id, inputs, HTTP status, words both messages hold, then model/version/outputs
    Case("unknown_model", [image()], 404, ("unknown model 'nope'",), model="nope"),
    Case("unknown_version", [image()], 404, ("'digits'", "version '7'"), version="7"),
    Case("wrong_input_name", [image(name="img")], 400, ("'img'",)),
    Case("missing_input", [image([1, 4], np.zeros(4, F32), name="data")], 400, ("idx:",),
         model="gather"),
    Case("wrong_dtype", [image(values=np.zeros(64), datatype="FP64")], 400,
         ("'image'", "float32")),
    Case("wrong_shape", [image([1, 8, 8, 2], np.zeros(128, F32))], 400, ("'image'",)),
    Case("rank_too_high", [image([1] * 70, np.zeros(1, F32))], 400,
         ("input 'image'", "70 dimensions", f"at most {MAX_RANK}")),
    Case("rank_above_limit", [image([1] * (MAX_RANK + 1), np.zeros(1, F32))], 400,
         ("input 'image'", f"{MAX_RANK + 1} dimensions")),
    Case("dim_too_large", [image([0, 2**40, 2**40], np.zeros(0, F32))], 400,
         ("input 'image'", "bytes")),
    Case("dim_above_limit", [image([2**63 - 1], np.zeros(0, F32))], 400,
         ("input 'image'", "dimension above")),
    Case("negative_dim", [image([-1, 8, 8, 1])], 400, ("input 'image'", "negative")),
    Case("data_count_mismatch", [image(values=np.zeros(63, F32))], 400,
         ("input 'image'", "needs"), same_text=False),  # JSON counts elements, raw bytes
    Case("unsupported_datatype", [image(values=np.zeros(64, np.uint8), datatype="FP8")], 400,
         ("input 'image'", "FP8")),
    Case("bytes_not_allowed", [image(values=[b"0"] * 64, datatype="BYTES")], 400, ("'image'",)),
    Case("input_twice", [image(), image()], 400, ("input 'image'", "twice")),
    Case("unknown_output", [image()], 400, ("'nope'",), outputs=("nope",)),
]
# fmt: on


def _grpc_status(http_status: int) -> grpc.StatusCode:
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND}[http_status]


def _over_http(address: str, case: Case) -> tuple[int, str]:
    path = f"/v2/models/{case.model}" + (f"/versions/{case.version}" if case.version else "")
    body: dict = {"inputs": [t.json() for t in case.inputs]}
    if case.outputs:
        body["outputs"] = [{"name": n} for n in case.outputs]
    resp = httpx.post(f"http://{address}{path}/infer", json=body, timeout=30)
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    return resp.status_code, resp.json()["error"]


def _over_grpc(stub: Any, case: Case) -> tuple[grpc.StatusCode, str]:
    request = service_pb2.ModelInferRequest(model_name=case.model, model_version=case.version)
    for t in case.inputs:
        request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.raw())
    for name in case.outputs:
        request.outputs.add(name=name)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=30)
    return excinfo.value.code(), excinfo.value.details()


@pytest.fixture(scope="module")
def transports(repo_dir):
    """digits v1/v2 and gather, served over HTTP and gRPC; a gRPC stub."""
    with running_servers(make_app(repo_dir)) as s:
        with grpc.insecure_channel(s.grpc) as channel:
            yield s.http, service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_same_answer_over_http_and_grpc(transports, case):
    http_address, stub = transports
    status, http_text = _over_http(http_address, case)
    code, grpc_text = _over_grpc(stub, case)
    assert status == case.status, http_text
    assert code == _grpc_status(case.status), grpc_text
    for words in case.words:
        assert words in http_text, http_text
        assert words in grpc_text, grpc_text
    if case.same_text:
        assert http_text == grpc_text


def test_servers_still_answer_after_the_table(transports):
    """None of the rows above left a transport broken (no crash, no leaked slot)."""
    http_address, stub = transports
    x = np.full(IMAGE, 0.5, np.float32)
    ok = Case("ok", [image(values=x.ravel())], 200, ())
    resp = httpx.post(
        f"http://{http_address}/v2/models/digits/infer",
        json={"inputs": [t.json() for t in ok.inputs]},
    )
    assert resp.status_code == 200, resp.text
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="FP32", shape=IMAGE)
    request.raw_input_contents.append(x.tobytes())
    response = stub.ModelInfer(request, timeout=30)
    by_name = {o.name: i for i, o in enumerate(response.outputs)}
    grpc_probs = np.frombuffer(response.raw_output_contents[by_name["probs"]], "<f4")
    http_probs = next(o for o in resp.json()["outputs"] if o["name"] == "probs")["data"]
    np.testing.assert_array_equal(grpc_probs, np.asarray(http_probs, np.float32))


# -- the server's bounds, over both transports ------------------------------------------------
#
# Each row starts its own server pair (the bounds are per server) and sends one request over
# HTTP and one over gRPC. What the server must answer comes from Triton's mapping (written
# out here, not read from the server's table): 413 / 401 / 503 / 408 over HTTP, and
# RESOURCE_EXHAUSTED / UNAUTHENTICATED / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED over gRPC.


@dataclasses.dataclass(frozen=True)
class Limit:
    """A bound of the server, the request that meets it, and both answers."""

    id: str
    app: dict  # make_app keywords (the bound)
    rows: int  # images in the request (32 x 256 bytes = 8 KiB)
    status: int
    code: grpc.StatusCode
    words: tuple[str, ...]  # in the message of both transports
    token: str | None = None  # the server's token (the request sends none)
    hold: str = ""  # "one": one request waits in the model first; "all": every run waits


LIMITS = [
    Limit("message_over_body_limit", {"max_body_bytes": 4096}, 32, 413,
          grpc.StatusCode.RESOURCE_EXHAUSTED, ("4096",)),
    Limit("missing_token", {"token": "s3cret"}, 1, 401, grpc.StatusCode.UNAUTHENTICATED,
          ("missing or invalid bearer token",), token="s3cret"),
    Limit("inflight_bound_full",
          {"max_inflight_requests": 1, "admission_wait_s": 0.2, "max_batch": 1}, 1, 503,
          grpc.StatusCode.RESOURCE_EXHAUSTED, ("server busy",), hold="one"),
    Limit("stuck_model_deadline", {"request_timeout_s": 0.5, "max_batch": 1}, 1, 408,
          grpc.StatusCode.DEADLINE_EXCEEDED,
          ("model 'digits' version 2: no answer within 0.5 s",), hold="all"),
]  # fmt: skip


def _digits_json(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip


def _digits_grpc(x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="2")
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


@pytest.mark.parametrize("limit", LIMITS, ids=[c.id for c in LIMITS])
def test_bound_same_answer_over_http_and_grpc(repo_dir, limit):
    app = make_app(repo_dir, **limit.app)
    release, entered = hold_model_runs(app) if limit.hold else (threading.Event(), None)
    x = images(limit.rows, seed=90)
    timeout_s = limit.app.get("request_timeout_s")
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(
            running_servers(app, token=limit.token, request_timeout_s=timeout_s)
        )
        stack.callback(release.set)
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        channel = stack.enter_context(grpc.insecure_channel(s.grpc))
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        url = f"http://{s.http}/v2/models/digits/versions/2/infer"
        held = None
        if limit.hold == "one":  # one request in the model holds the only slot
            held = pool.submit(httpx.post, url, json=_digits_json(x), timeout=60)
            assert entered.wait(30), "the held request never reached the model"
            wait_until(lambda: app.admission.requests == 1, 10, message="not admitted")
        resp = httpx.post(url, json=_digits_json(x), timeout=30)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(_digits_grpc(x))  # no deadline of its own
        assert resp.status_code == limit.status, resp.text
        assert set(resp.json()) == {"error"}, resp.text
        assert excinfo.value.code() == limit.code, excinfo.value.details()
        for words in limit.words:
            assert words in resp.json()["error"]
            assert words in excinfo.value.details()
        release.set()
        if held is not None:  # the held request itself is answered, and right
            answer = held.result(timeout=60)
            assert answer.status_code == 200, answer.text
            probs = next(o for o in answer.json()["outputs"] if o["name"] == "probs")["data"]
            np.testing.assert_allclose(
                np.asarray(probs).reshape(-1, 10), digits_reference(x, 1)["probs"], RTOL, ATOL
            )
        # every slot came back: the next request (with the token, under the limit) is answered
        wait_until(lambda: app.admission.requests == 0, 10, message="a slot was never freed")
        small = images(1, seed=91)
        metadata = [("authorization", f"Bearer {limit.token}")] if limit.token else None
        answer = stub.ModelInfer(_digits_grpc(small), timeout=30, metadata=metadata)
        i = [o.name for o in answer.outputs].index("probs")
        probs = np.frombuffer(answer.raw_output_contents[i], "<f4").reshape(-1, 10)
        np.testing.assert_allclose(probs, digits_reference(small, 1)["probs"], RTOL, ATOL)
