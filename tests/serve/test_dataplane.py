"""The transport-free data plane and the pieces both transports share (auth, errors, logs).

The data plane is driven here with no HTTP or gRPC at all: a decode and an encode
callable stand in for a transport's codec. Numbers are compared with the float64 NumPy
reference of the digits model (float32 tolerances rtol=1e-4, atol=1e-5).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading

import grpc
import numpy as np
import pytest
from serve_models import digits_reference, images
from support import metric

from bnexport.serve.core import model_control
from bnexport.serve.core.auth import BearerToken
from bnexport.serve.core.dataplane import DataPlane
from bnexport.serve.core.logs import JsonLineFormatter, log_access
from bnexport.serve.core.metrics import ServerMetrics
from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.core.state import ServerState
from bnexport.serve.protocol import errors
from bnexport.serve.protocol.codec import DecodedRequest
from bnexport.serve.protocol.errors import (
    BadRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
    UnauthorizedError,
    error_body,
    grpc_code_name,
)
from bnexport.serve.protocol.types import RequestOutput

RTOL, ATOL = 1e-4, 1e-5


# -- auth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sent, ok",
    [
        ("Bearer s3cret", True),
        (b"Bearer s3cret", True),
        ("bearer s3cret", True),  # the scheme is case-insensitive (RFC 9110 11.1)
        ("  BEARER   s3cret  ", True),
        ("Bearer s3cret2", False),
        ("Bearer s3cre", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_token(sent, ok):
    token = BearerToken("s3cret")
    assert token.required
    assert token.accepts(sent) is ok
    if ok:
        token.check(sent, "how")
    else:
        with pytest.raises(UnauthorizedError, match=r"missing or invalid bearer token \(how\)"):
            token.check(sent, "how")


def test_no_token_accepts_everything():
    token = BearerToken(None)
    assert not token.required
    assert token.accepts(None) and token.accepts("Basic x")


# -- one error table for both transports --------------------------------------------------------
#: each error's HTTP status and gRPC code, as Triton answers them (written out, not read back)
EXPECTED = {
    "BadRequestError": (400, "INVALID_ARGUMENT"),
    "ModelNotFoundError": (404, "NOT_FOUND"),
    "UnauthorizedError": (401, "UNAUTHENTICATED"),
    "PayloadTooLargeError": (413, "RESOURCE_EXHAUSTED"),
    "RequestTimeoutError": (408, "DEADLINE_EXCEEDED"),
    "ClientGoneError": (499, "CANCELLED"),
    "UnavailableError": (503, "UNAVAILABLE"),
    "OverloadedError": (503, "RESOURCE_EXHAUSTED"),
    "ModelRunError": (500, "INTERNAL"),
    "ServeError": (500, "INTERNAL"),
    "ModelControlError": (409, "FAILED_PRECONDITION"),
    "ModelLoadError": (400, "INVALID_ARGUMENT"),
}


def _serve_errors() -> dict[str, type]:
    found = {}
    for module in (errors, model_control):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, errors.ServeError) and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def test_every_serve_error_has_its_http_status_and_grpc_code():
    found = _serve_errors()
    assert set(found) == set(EXPECTED)  # a new error class needs a row here
    for name, cls in found.items():
        exc = cls("boom")
        status, code = EXPECTED[name]
        assert (exc.status_code, grpc_code_name(exc)) == (status, code), name
        assert code in grpc.StatusCode.__members__
    assert grpc_code_name(ValueError("not a ServeError")) == "INTERNAL"
    assert grpc_code_name(errors.ServeError("teapot", status_code=418)) == "UNKNOWN"


def test_error_body_is_the_kserve_error_object():
    assert json.loads(error_body('a "quoted" \u00e9 message')) == {
        "error": 'a "quoted" \u00e9 message'
    }


# -- the access record --------------------------------------------------------------------------
def test_log_access_writes_one_record():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("bnexport.serve.test_dataplane")
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    start = __import__("time").perf_counter()
    log_access(logger, method="grpc", path="/x/Y", status="OK", start=start, client="h:1")
    log_access(logger, method=None, path=None, status=400, start=None, client=None, error="bad")
    logger.setLevel(logging.WARNING)
    log_access(logger, method="GET", path="/", status=200, start=start, client=None)
    assert len(records) == 2
    first, second = (json.loads(JsonLineFormatter().format(r)) for r in records)
    assert first["event"] == "request" and first["status"] == "OK" and first["ms"] >= 0
    assert {k: first[k] for k in ("method", "path", "client")} == {
        "method": "grpc",
        "path": "/x/Y",
        "client": "h:1",
    }
    assert "error" not in first
    assert second["error"] == "bad" and "ms" not in second and second["status"] == 400


# -- the data plane without a transport ---------------------------------------------------------
def _dataplane(repo_dir, **kwargs) -> DataPlane:
    repository = ModelRepository.from_path(repo_dir, max_batch=8, batch_timeout_ms=2.0)
    state = ServerState(repository, ServerMetrics(), instances=1)
    return DataPlane(state, **kwargs)


def _decode(x: np.ndarray, outputs=None):
    async def decode() -> DecodedRequest:
        return DecodedRequest(id="r1", inputs={"image": x}, outputs=outputs, binary_output=True)

    return decode


def _encode(model, req, results) -> tuple:
    return model.name, model.version, req.id, results


def test_infer_metadata_and_statistics_without_a_transport(repo_dir):
    dataplane = _dataplane(repo_dir)
    xs = [images(1 + i % 3, seed=100 + i) for i in range(6)]

    async def main():
        answers = await asyncio.gather(
            *(dataplane.infer("digits", "", _decode(x), _encode) for x in xs)
        )
        only = [RequestOutput(name="probs")]
        one = await dataplane.infer("digits", "1", _decode(xs[0], only), _encode)
        with pytest.raises(BadRequestError, match="'nope'"):
            await dataplane.infer(
                "digits", "1", _decode(xs[0], [RequestOutput(name="nope")]), _encode
            )
        with pytest.raises(ModelNotFoundError, match="unknown model 'ghost'"):
            await dataplane.infer("ghost", None, _decode(xs[0]), _encode)
        await dataplane.state.drain()
        return answers, one

    answers, one = asyncio.run(main())
    for x, (name, version, rid, results) in zip(xs, answers, strict=True):
        assert (name, version, rid) == ("digits", "2", "r1")  # the default version: highest
        np.testing.assert_allclose(results["probs"], digits_reference(x, 1)["probs"], RTOL, ATOL)
    np.testing.assert_allclose(one[3]["probs"], digits_reference(xs[0], 0)["probs"], RTOL, ATOL)
    stats = dataplane.statistics("digits", "2")["model_stats"][0]
    assert stats["inference_count"] == sum(len(x) for x in xs)
    assert stats["inference_stats"]["success"]["count"] == len(xs)
    text = dataplane.state.metrics.render().decode()
    assert metric(text, "bnexport_requests_total", model="digits", version="2", status="200") == 6
    assert metric(text, "bnexport_requests_total", model="digits", version="1", status="400") == 1
    assert metric(text, "bnexport_requests_total", model="unknown", version="", status="404") == 1
    assert dataplane.model_metadata("digits", None).versions == ["1", "2"]
    # drained above: neither the server nor its models report ready any more
    assert not dataplane.model_ready("digits", "1") and not dataplane.ready()
    with pytest.raises(ModelNotFoundError):
        dataplane.model_ready("digits", "7")
    assert {r["name"] for r in dataplane.repository_index(ready_only=True)} == {"digits", "gather"}
    assert "statistics" in dataplane.server_metadata()["extensions"]
    assert dataplane.server_metadata(("binary_tensor_data",))["extensions"][0] == (
        "binary_tensor_data"
    )


def test_deadline_and_admission_apply_to_any_transport(repo_dir):
    """A stuck model: 408 after the deadline, the admission slot and the batcher come back."""
    from bnexport.serve.core.admission import Admission

    admission = Admission(1 << 20, 4)
    dataplane = _dataplane(repo_dir, admission=admission, request_timeout_s=0.3)
    model = dataplane.state.repository.get("digits", "2")
    run, release = model.run, threading.Event()

    def stuck(feed):
        assert release.wait(60)
        return run(feed)

    model.run = stuck
    x = images(1, seed=120)

    async def main():
        with pytest.raises(RequestTimeoutError, match="no answer within 0.3 s"):
            await dataplane.infer("digits", "2", _decode(x), _encode, cost=1000, deadline_s=0.3)
        assert admission.requests == 0 and admission.bytes == 0
        release.set()
        answer = await dataplane.infer("digits", "2", _decode(x), _encode, cost=1000)
        await dataplane.state.drain()
        return answer

    try:
        answer = asyncio.run(main())
    finally:
        release.set()
    np.testing.assert_allclose(answer[3]["probs"], digits_reference(x, 1)["probs"], RTOL, ATOL)
    text = dataplane.state.metrics.render().decode()
    assert metric(text, "bnexport_requests_total", model="digits", version="2", status="408") == 1
    assert metric(text, "bnexport_inflight_requests", model="digits", version="2") == 0


# -- where things live --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lower, upper",
    [
        ("bnexport.serve.grpc", "bnexport.serve.rest"),  # both transports sit on the data plane
        ("bnexport.serve.rest", "bnexport.serve.grpc"),
        ("bnexport.serve.protocol", "bnexport.serve.rest"),
        ("bnexport.serve.protocol", "bnexport.serve.grpc"),
    ],
)
def test_transports_and_codecs_do_not_import_each_other(lower, upper):
    from support import import_graph

    edges = import_graph.module_edges(import_graph.project_modules())
    back = sorted(
        f"{source} -> {target}"
        for source, targets in edges.items()
        if source.startswith(lower + ".")
        for target in targets
        if target.startswith(upper + ".")
    )
    assert back == []


def test_server_state_has_one_home():
    """Every module that names ``ServerState`` (TYPE_CHECKING imports too) takes core.state's."""
    import ast
    from pathlib import Path

    from support import import_graph

    wrong = []
    for name, path in import_graph.project_modules().items():
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any(
                a.name == "ServerState" for a in node.names
            ):
                if node.module != "bnexport.serve.core.state":
                    wrong.append(f"{name}: from {node.module} import ServerState")
            if isinstance(node, ast.ClassDef) and node.name == "ServerState":
                if name != "bnexport.serve.core.state":
                    wrong.append(f"{name}: class ServerState")
    assert wrong == []


def test_model_config_of_unbatched_and_per_item_scalar_models(tmp_path):
    """The served config is Triton's: one message, valid config.pbtxt, HTTP JSON derived."""
    import onnx
    from onnx import TensorProto, helper
    from serve_models import _model, fixed_batch_model

    from bnexport.serve.triton.config import check_round_trip, config_json, render_config

    vec = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N"])],
        [],
    )
    for name, model in (("fixed", fixed_batch_model()), ("vec", vec)):
        (tmp_path / name / "1").mkdir(parents=True)
        onnx.save(model, tmp_path / name / "1" / "model.onnx")
    repository = ModelRepository.from_path(tmp_path, max_batch=8, batch_timeout_ms=2.5)
    dataplane = DataPlane(ServerState(repository, ServerMetrics(), instances=1))

    fixed = dataplane.model_config("fixed", None)
    body = config_json(fixed)
    assert body["max_batch_size"] == 0  # a fixed batch: requests are never merged
    assert [(t["name"], t["data_type"], t["dims"]) for t in body["input"]] == [
        ("x", "TYPE_FP32", [1, 4])  # the batch dimension stays in dims
    ]
    assert "dynamic_batching" not in body
    # a batchable [N] tensor: nothing but the batch, written as Triton wants it
    per_item = config_json(dataplane.model_config("vec", "1"))
    assert per_item["max_batch_size"] == 8
    assert per_item["input"][0]["dims"] == [1] and per_item["input"][0]["reshape"] == {"shape": []}
    assert per_item["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
    for cfg in (fixed, dataplane.model_config("vec", "1")):
        check_round_trip(render_config(cfg, source="test"), cfg)  # a valid config.pbtxt
    with pytest.raises(ModelNotFoundError):
        dataplane.model_config("nope", None)
