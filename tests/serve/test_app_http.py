"""HTTP-level robustness: KServe error bodies, body limit, metrics, logs, repository config."""

from __future__ import annotations

import gzip
import io
import json
import logging

import httpx
import numpy as np
import onnx
import pytest
from serve_helpers import make_app, metric, running_server
from serve_models import digits_cnn, digits_reference, fixed_batch_model, images

from bnexport.serve.core.logs import JsonLineFormatter, get_logger
from bnexport.serve.core.repository import ModelRepository

RTOL, ATOL = 1e-4, 1e-5  # float32 model vs float64 NumPy


def _infer_json(x: np.ndarray) -> dict:
    return {
        "inputs": [
            {
                "name": "image",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }


def _assert_error(resp: httpx.Response, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and fragment in body["error"], body


def test_plain_json_infer_with_httpx(server):
    x = images(2, 5)
    resp = httpx.post(f"http://{server}/v2/models/digits/versions/1/infer", json=_infer_json(x))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    out = {o["name"]: o for o in resp.json()["outputs"]}
    got = np.array(out["probs"]["data"], np.float32).reshape(out["probs"]["shape"])
    np.testing.assert_allclose(got, digits_reference(x, 0)["probs"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"{", "malformed inference request"),
        (b"[]", "malformed inference request"),
        (b'{"inputs": [{"name": "image"}]}', "inputs.0.shape"),
    ],
)
def test_malformed_json_is_400(server, content, fragment):
    resp = httpx.post(f"http://{server}/v2/models/digits/infer", content=content)
    _assert_error(resp, 400, fragment)
    assert httpx.get(f"http://{server}/v2/health/live").status_code == 200


def test_unknown_route_and_method(server):
    _assert_error(httpx.get(f"http://{server}/v2/nothing"), 404, "Not Found")
    _assert_error(httpx.get(f"http://{server}/v2/models/digits/infer"), 405, "Method Not Allowed")


def test_oversize_body_is_413(server):
    big = images(1100, 0)  # ~1.5 MB of JSON > the fixture's 1 MiB limit
    resp = httpx.post(f"http://{server}/v2/models/digits/infer", json=_infer_json(big))
    _assert_error(resp, 413, "over the limit")

    def chunks():  # no Content-Length: counted while streaming
        payload = json.dumps(_infer_json(big)).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    resp = httpx.post(f"http://{server}/v2/models/digits/infer", content=chunks())
    _assert_error(resp, 413, "over the limit")
    bomb = gzip.compress(b" " * (2 << 20))  # small on the wire, 2 MiB decoded
    resp = httpx.post(
        f"http://{server}/v2/models/digits/infer",
        content=bomb,
        headers={"Content-Encoding": "gzip"},
    )
    _assert_error(resp, 413, "decompressed")
    assert httpx.get(f"http://{server}/v2/health/ready").status_code == 200


def test_metrics_exposed(server):
    httpx.post(f"http://{server}/v2/models/digits/infer", json=_infer_json(images(3, 0)))
    httpx.post(f"http://{server}/v2/models/nope/infer", json=_infer_json(images(1, 0)))
    resp = httpx.get(f"http://{server}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert metric(text, "bnexport_requests_total", model="digits", version="2", status="200") >= 1
    assert metric(text, "bnexport_requests_total", model="unknown", status="404") >= 1
    assert metric(text, "bnexport_request_latency_seconds_count", model="digits", version="2") >= 1
    assert metric(text, "bnexport_batch_size_sum", model="digits", version="2") >= 3
    assert "bnexport_queue_depth" in text


def test_access_log_is_json_lines(repo_dir):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logger = get_logger()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with running_server(make_app(repo_dir)) as url:
            httpx.post(f"http://{url}/v2/models/digits/infer", json=_infer_json(images(1, 0)))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [r for r in records if r["event"] == "request"]
    assert access and access[0]["path"] == "/v2/models/digits/infer"
    assert access[0]["status"] == 200 and access[0]["ms"] > 0
    assert {"ts", "level", "logger"} <= set(access[0])
    assert any(r["event"] == "draining" for r in records)


def test_repository_config_and_single_file(tmp_path):
    single = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), single)
    repo = ModelRepository.from_path(single, max_batch=16)
    model = repo.get("digits")
    assert (model.name, model.version, model.max_batch, model.batchable) == (
        "digits",
        "1",
        16,
        True,
    )

    root = tmp_path / "repo"
    for v in ("1", "2", "3"):
        (root / "digits" / v).mkdir(parents=True)
        onnx.save(digits_cnn(0), root / "digits" / v / "net.onnx")
    (root / "digits" / "config.pbtxt").write_text(
        'name: "digits"\nmax_batch_size: 8\ndefault_model_filename: "net.onnx"\n'
        "dynamic_batching { max_queue_delay_microseconds: 5000 }\n"
        "version_policy { latest { num_versions: 2 } }\n"
    )
    (root / "fixed" / "1").mkdir(parents=True)
    onnx.save(fixed_batch_model(), root / "fixed" / "1" / "model.onnx")
    repo = ModelRepository.from_path(root, max_batch=32, batch_timeout_ms=2)
    assert repo.names() == ["digits", "fixed"]
    assert repo.versions("digits") == ["2", "3"]
    d = repo.get("digits")
    assert (d.version, d.max_batch, d.batch_timeout_s) == ("3", 8, 0.005)
    fixed = repo.get("fixed")
    assert not fixed.batchable and fixed.max_batch == 1


def test_warmup_runs_the_largest_batch(tmp_path):
    from bnexport.serve.core.repository import default_session_factory

    shapes: list[tuple] = []

    class Recording:
        def __init__(self, path, **kwargs):
            self._s = default_session_factory(path, **kwargs)
            self.inputs, self.outputs = self._s.inputs, self._s.outputs

        def run(self, feed):
            shapes.append(tuple(next(iter(feed.values())).shape))
            return self._s.run(feed)

    single = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), single)
    model = ModelRepository.from_path(single, max_batch=12, session_factory=Recording).get("digits")
    assert model.warmup_batch_sizes() == [12, 12, 6, 6, 3, 3, 1, 1]
    assert model.warmup() and shapes == [(b, 8, 8, 1) for b in (12, 12, 6, 6, 3, 3, 1, 1)]

    dynamic = digits_cnn(0)
    dynamic.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "H"
    onnx.save(dynamic, single)
    model = ModelRepository.from_path(single, session_factory=Recording).get("digits")
    assert not model.warmup() and len(shapes) == 8

    onnx.save(fixed_batch_model(), single)
    model = ModelRepository.from_path(single, session_factory=Recording).get("digits")
    fixed_shape = tuple(model.inputs[0].shape)
    assert not model.batchable and model.warmup_batch_sizes() == []
    assert model.warmup() and shapes[8:] == [fixed_shape, fixed_shape]


def test_run_options_reach_every_session_run(tmp_path):
    """``run_options`` from the repository go to warm-up and batched runs; answers unchanged."""
    import onnxruntime as ort

    from bnexport.serve.core.repository import default_session_factory
    from bnexport.serve.core.session_options import ort_run_options

    seen: list = []

    class Recording:
        def __init__(self, path, **kwargs):
            self._s = default_session_factory(path, **kwargs)
            self.inputs, self.outputs = self._s.inputs, self._s.outputs

        def run(self, feed, run_options=None):
            seen.append(run_options)
            return self._s.run(feed, run_options=run_options)

    options = ort_run_options("onnxruntime", "cpu")
    assert isinstance(options, ort.RunOptions)
    assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert ort_run_options("onnxruntime", "cpu", memory_arena=False) is None
    assert ort_run_options("onnxruntime", "cpu", arena_shrinkage=False) is None
    assert ort_run_options("tensorrt", "cuda") is None

    single = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), single)
    repo = ModelRepository.from_path(
        single, max_batch=8, session_factory=Recording, run_options=options
    )
    model = repo.get("digits")
    assert model.warmup() and seen == [options] * 8
    x = images(5, seed=3)
    out = model.run({"image": x})
    np.testing.assert_allclose(out["probs"], digits_reference(x)["probs"], rtol=RTOL, atol=ATOL)
    assert seen[-1] is options
    plain = ModelRepository.from_path(single, session_factory=Recording).get("digits")
    plain.run({"image": x})
    assert seen[-1] is None
