"""The server against an unmodified ``tritonclient.http`` client, over loopback HTTP.

Numbers are compared with a float64 NumPy reference of the model: float32
tolerances rtol=1e-4, atol=1e-5 (a 256-term dot product in float32). Batched
and unbatched server answers are compared bit for bit (onnxruntime on CPU
computes each sample independently of the batch it is in).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from serve_helpers import make_app, metric, running_server
from serve_models import digits_reference, images
from tritonclient.utils import InferenceServerException

RTOL, ATOL = 1e-4, 1e-5


def _client(url: str, **kw) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url, **kw)


def _input(x: np.ndarray, binary: bool, name: str = "image") -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(x.shape), "FP32" if x.dtype == np.float32 else "INT64")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_health_and_server_metadata(server):
    client = _client(server)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "bnexport"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_ready(server):
    client = _client(server)
    meta = client.get_model_metadata("digits")
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probs"]
    assert all(o["shape"] == [-1, 10] for o in meta["outputs"])
    assert client.get_model_metadata("digits", "1")["versions"] == ["1"]
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "2")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("nope")
    config = client.get_model_config("digits")
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == [8, 8, 1]


@pytest.mark.parametrize("binary_in", [False, True], ids=["json_in", "binary_in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
def test_infer_matches_numpy(server, binary_in, binary_out):
    client = _client(server)
    x = images(3, seed=1)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("probs", "logits")
    ]
    result = client.infer("digits", [_input(x, binary_in)], outputs=outputs, request_id="r-1")
    ref = digits_reference(x, seed=1)  # no version given: the highest (2, seed 1)
    response = result.get_response()
    assert response["model_version"] == "2"
    assert response["id"] == "r-1"
    assert [o["name"] for o in response["outputs"]] == ["probs", "logits"]
    for name in ("logits", "probs"):
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == (3, 10)
        np.testing.assert_allclose(got, ref[name], rtol=RTOL, atol=ATOL)
        has_binary = "binary_data_size" in (
            next(o for o in response["outputs"] if o["name"] == name).get("parameters") or {}
        )
        assert has_binary == binary_out


def test_infer_versions_and_default_binary_outputs(server):
    client = _client(server)
    x = images(2, seed=2)
    for version, seed in (("1", 0), ("2", 1)):
        result = client.infer("digits", [_input(x, True)], model_version=version)  # all outputs
        assert result.get_response()["model_version"] == version
        np.testing.assert_allclose(
            result.as_numpy("probs"), digits_reference(x, seed)["probs"], rtol=RTOL, atol=ATOL
        )


def test_gzip_request(server):
    client = _client(server)
    x = images(2, seed=3)
    result = client.infer(
        "digits", [_input(x, True)], model_version="1", request_compression_algorithm="gzip"
    )
    np.testing.assert_allclose(
        result.as_numpy("logits"), digits_reference(x, 0)["logits"], rtol=RTOL, atol=ATOL
    )


def test_dynamic_batching_merges_and_matches_unbatched(repo_dir):
    """32 concurrent one-image requests -> a few model runs, same bits as one-by-one runs."""
    xs = [images(1, seed=100 + i) for i in range(32)]
    batched = make_app(repo_dir, max_batch=32, batch_timeout_ms=100.0, batch_policy="window")
    unbatched = make_app(repo_dir, max_batch=1)
    with running_server(batched) as url_b, running_server(unbatched) as url_u:
        client_b = _client(url_b, concurrency=32)
        pending = [client_b.async_infer("digits", [_input(x, True)], model_version="1") for x in xs]
        got = [p.get_result().as_numpy("logits") for p in pending]
        client_u = _client(url_u)
        want = [
            client_u.infer("digits", [_input(x, True)], model_version="1").as_numpy("logits")
            for x in xs
        ]
        text_b = httpx.get(f"http://{url_b}/metrics").text
        text_u = httpx.get(f"http://{url_u}/metrics").text
    runs_b = metric(text_b, "bnexport_batch_size_count", model="digits", version="1")
    rows_b = metric(text_b, "bnexport_batch_size_sum", model="digits", version="1")
    runs_u = metric(text_u, "bnexport_batch_size_count", model="digits", version="1")
    assert rows_b == 32
    assert runs_u == 32
    assert runs_b <= 8, f"32 concurrent requests took {runs_b} model runs"
    assert (
        metric(text_b, "bnexport_requests_total", model="digits", version="1", status="200") == 32
    )
    for g, w, x in zip(got, want, xs, strict=True):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(g, digits_reference(x, 0)["logits"], rtol=RTOL, atol=ATOL)


def _status(exc_info) -> str:
    return str(exc_info.value.status())


@pytest.mark.parametrize(
    "make_inputs, fragment",
    [
        (lambda: [_input(images(1, 0), True, name="img")], "unknown input"),
        (lambda: [_input(np.zeros((1, 8, 8, 2), np.float32), True)], "8, 8, 2"),
        (lambda: [_input(np.zeros((1, 8, 8, 1), np.int64), True)], "int64"),
        (lambda: [], "missing input"),
    ],
    ids=["name", "shape", "dtype", "missing"],
)
def test_bad_inputs_are_400_and_server_survives(server, make_inputs, fragment):
    client = _client(server)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("digits", make_inputs())
    assert _status(exc) == "400"
    assert fragment in exc.value.message().lower() and "image" in exc.value.message()
    assert client.is_server_live()
    client.infer("digits", [_input(images(1, 0), True)])  # still serving


def test_unknown_model_and_version_are_404(server):
    client = _client(server)
    for kwargs in ({"model_name": "nope"}, {"model_name": "digits", "model_version": "9"}):
        with pytest.raises(InferenceServerException) as exc:
            client.infer(inputs=[_input(images(1, 0), True)], **kwargs)
        assert _status(exc) == "404"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nope")
    assert _status(exc) == "404"


def test_unknown_output_is_400(server):
    client = _client(server)
    with pytest.raises(InferenceServerException) as exc:
        client.infer(
            "digits",
            [_input(images(1, 0), True)],
            outputs=[httpclient.InferRequestedOutput("nope")],
        )
    assert _status(exc) == "400" and "unknown output 'nope'" in exc.value.message()


def test_failing_request_gets_500_alone(repo_dir):
    """A bad index makes the model raise; only that request fails, even inside a merged batch."""
    app = make_app(repo_dir, max_batch=32, batch_timeout_ms=200.0, batch_policy="window")
    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    with running_server(app) as url:
        client = _client(url, concurrency=6)
        pending = []
        for i in range(6):
            idx = np.array([[i % 4 if i != 3 else 99]], dtype=np.int64)
            pending.append(
                client.async_infer(
                    "gather", [_input(data[i : i + 1], True, "data"), _input(idx, True, "idx")]
                )
            )
        outcomes = []
        for p in pending:
            try:
                outcomes.append(p.get_result().as_numpy("out"))
            except InferenceServerException as exc:
                outcomes.append(exc)
        text = httpx.get(f"http://{url}/metrics").text
        assert _client(url).is_server_live()
    for i, out in enumerate(outcomes):
        if i == 3:
            assert isinstance(out, InferenceServerException) and str(out.status()) == "500"
            assert "gather" in out.message()
        else:
            np.testing.assert_array_equal(out, data[i : i + 1, [i % 4]])
    assert metric(text, "bnexport_requests_total", model="gather", version="1", status="500") == 1
    assert metric(text, "bnexport_requests_total", model="gather", version="1", status="200") == 5


def test_token_auth(repo_dir):
    app = make_app(repo_dir, token="s3cret")
    x = images(1, 0)
    with running_server(app) as url:
        client = _client(url)
        assert client.is_server_live()  # health stays open for probes
        with pytest.raises(InferenceServerException) as exc:
            client.infer("digits", [_input(x, True)])
        assert _status(exc) == "401"
        with pytest.raises(InferenceServerException) as exc:
            client.infer("digits", [_input(x, True)], headers={"Authorization": "Bearer wrong"})
        assert _status(exc) == "401"
        result = client.infer(
            "digits", [_input(x, True)], headers={"Authorization": "Bearer s3cret"}
        )
        np.testing.assert_allclose(
            result.as_numpy("probs"), digits_reference(x, 1)["probs"], rtol=RTOL, atol=ATOL
        )
        assert httpx.get(f"http://{url}/metrics").status_code == 401
