"""gRPC's bounds: concurrent RPCs (before a message is read) and the server's deadline.

A model whose run blocks on a :class:`threading.Event` stands in for a stuck or slow
model, so the tests hold RPCs in flight for exactly as long as they need.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_helpers import running_servers
from serve_helpers import hold_model_runs, make_app
from serve_models import digits_reference, images
from support import metric, wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc

RTOL, ATOL = 1e-4, 1e-5  # float32 model vs float64 NumPy


def _request(x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="2")
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def _probs(response) -> np.ndarray:
    i = [o.name for o in response.outputs].index("probs")
    return np.frombuffer(response.raw_output_contents[i], "<f4").reshape(-1, 10)


@pytest.fixture
def stub_factory() -> Iterator:
    channels = []

    def make(address: str):
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return service_pb2_grpc.GRPCInferenceServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


def test_rpcs_beyond_the_inflight_bound_are_refused_before_parsing(repo_dir, stub_factory):
    """Two RPCs may be in flight; a third is RESOURCE_EXHAUSTED at once (not queued)."""
    # a long admission wait: over the bound, the old server queued the third for 30 s
    app = make_app(repo_dir, max_inflight_requests=2, admission_wait_s=30.0, max_batch=1)
    release, _ = hold_model_runs(app)
    xs = [images(1, seed=70 + i) for i in range(3)]
    with running_servers(app) as s:
        stub = stub_factory(s.grpc)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            try:
                held = [pool.submit(stub.ModelInfer, _request(x), timeout=60) for x in xs[:2]]
                wait_until(lambda: app.admission.requests == 2, 30, message="not both admitted")
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as excinfo:
                    stub.ModelInfer(_request(xs[2]), timeout=10)
                assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - start < 5  # refused, not queued for admission
                assert app.admission.waiting == 0
            finally:
                release.set()
            answers = [f.result(timeout=60) for f in held]
        for x, answer in zip(xs[:2], answers, strict=True):
            np.testing.assert_allclose(_probs(answer), digits_reference(x, 1)["probs"], RTOL, ATOL)
        wait_until(lambda: app.admission.requests == 0, 10, message="slots never freed")
        third = stub.ModelInfer(_request(xs[2]), timeout=30)  # room again
        np.testing.assert_allclose(_probs(third), digits_reference(xs[2], 1)["probs"], RTOL, ATOL)


def test_stuck_request_without_deadline_gets_the_servers(repo_dir, stub_factory):
    """A call with no deadline ends DEADLINE_EXCEEDED after the server's; the slot comes back."""
    app = make_app(repo_dir, max_batch=1)
    release, entered = hold_model_runs(app)
    x = images(1, seed=80)
    with running_servers(app, request_timeout_s=0.5) as s:
        stub = stub_factory(s.grpc)
        try:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(_request(x))  # no deadline from the client
            elapsed = time.monotonic() - start
            assert entered.is_set()  # it was stuck in the model, not refused before
            assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            details = excinfo.value.details()
            assert "model 'digits' version 2" in details and "--body-timeout-s" in details
            assert 0.4 < elapsed < 10
            wait_until(lambda: app.admission.requests == 0, 10, message="slot never freed")
            text = app.state.metrics.render().decode()
            labels = {"model": "digits", "version": "2", "status": "408"}
            assert metric(text, "bnexport_requests_total", labels) == 1
            assert metric(text, "bnexport_inflight_requests", model="digits", version="2") == 0
        finally:
            release.set()
        # the model thread is free again: the next call is answered, and right
        answer = stub.ModelInfer(_request(x), timeout=30)
        np.testing.assert_allclose(_probs(answer), digits_reference(x, 1)["probs"], RTOL, ATOL)


def test_a_call_with_its_own_deadline_keeps_it(repo_dir, stub_factory):
    """The server's deadline is for calls without one: a longer client deadline is kept."""
    app = make_app(repo_dir, max_batch=1)
    release, entered = hold_model_runs(app)
    x = images(1, seed=81)
    with running_servers(app, request_timeout_s=0.3) as s:
        stub = stub_factory(s.grpc)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                call = pool.submit(stub.ModelInfer, _request(x), timeout=60)
                assert entered.wait(30)
                # three times the server's deadline: a call without one would have ended
                assert not release.wait(0.9) and not call.done()
            finally:
                release.set()
            answer = call.result(timeout=60)
    np.testing.assert_allclose(_probs(answer), digits_reference(x, 1)["probs"], RTOL, ATOL)
