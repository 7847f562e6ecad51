"""Triton's statistics extension: counts from the batcher, and the HTTP / gRPC endpoints.

Counts are exact (the fake model counts its own runs); durations are only
checked to be positive and consistent (success >= queue + compute of one run
for a request answered alone), never against wall-clock targets.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from serve_helpers import make_app, running_server
from serve_models import images

from bnexport.serve.core.batcher import DynamicBatcher
from bnexport.serve.core.statistics import REQUEST_FIELDS, ModelStats


class _CountingModel:
    """y = 2x; counts runs and the rows of each; raises on a row holding -1."""

    def __init__(self) -> None:
        self.runs: list[int] = []

    def __call__(self, feed: dict) -> dict:
        x = feed["x"]
        self.runs.append(len(x))
        time.sleep(0.002)
        if (x == -1).any():
            raise ValueError("row of -1")
        return {"y": 2 * x}


def _serve(stats: ModelStats, model: _CountingModel, xs: list[np.ndarray]) -> list:
    async def main():
        batcher = DynamicBatcher(model, max_batch=8, timeout_s=0.01, stats=stats)
        try:
            return await asyncio.gather(
                *(batcher.submit({"x": x}, len(x)) for x in xs), return_exceptions=True
            )
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_batcher_counts_requests_runs_and_rows():
    stats, model = ModelStats(), _CountingModel()
    xs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(12)]
    out = _serve(stats, model, xs)
    for x, y in zip(xs, out, strict=True):
        np.testing.assert_array_equal(y["y"], 2 * x)
    s = stats.as_dict("m", "1")
    assert s["execution_count"] == len(model.runs)
    assert len(model.runs) < len(xs)  # merged
    assert s["inference_count"] == sum(len(x) for x in xs)
    req = s["inference_stats"]
    for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert req[field]["count"] == len(xs), field
    assert req["fail"] == {"count": 0, "ns": 0}
    assert req["success"]["ns"] > req["compute_infer"]["ns"] / len(xs) > 0
    assert s["last_inference"] > 0
    batches = {b["batch_size"]: b for b in s["batch_stats"]}
    assert sum(b["compute_infer"]["count"] for b in batches.values()) == len(model.runs)
    assert sorted(batches) == sorted(set(model.runs))
    for size, b in batches.items():
        assert b["compute_infer"]["count"] == model.runs.count(size)


def test_batcher_counts_failures_per_request():
    stats, model = ModelStats(), _CountingModel()
    xs = [np.zeros((1, 2), np.float32), np.full((1, 2), -1, np.float32)]
    out = _serve(stats, model, xs)
    assert isinstance(out[1], ValueError)
    s = stats.as_dict("m", "1")
    assert s["inference_stats"]["fail"]["count"] == 1
    assert s["inference_stats"]["success"]["count"] == 1
    assert s["inference_count"] == 1
    assert s["execution_count"] == len(model.runs)  # failed runs are executions too


@pytest.fixture(scope="module")
def server(repo_dir):
    with running_server(make_app(repo_dir)) as url:
        yield url


def test_http_stats_like_triton(server):
    client = httpclient.InferenceServerClient(server)
    assert {"statistics", "model_repository"} <= set(client.get_server_metadata()["extensions"])
    before = client.get_inference_statistics("digits", "1")["model_stats"][0]
    x = images(3, seed=5)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    for _ in range(4):
        client.infer("digits", [inp], model_version="1")
    after = client.get_inference_statistics("digits", "1")["model_stats"][0]
    assert after["name"] == "digits" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["execution_count"] - before["execution_count"] == 4  # sequential: no merging
    for field in REQUEST_FIELDS:
        assert set(after["inference_stats"][field]) == {"count", "ns"}
    done = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    assert done == 4
    assert any(b["batch_size"] == 3 for b in after["batch_stats"])
    # every version of one model, and every model
    versions = client.get_inference_statistics("digits")["model_stats"]
    assert [(m["name"], m["version"]) for m in versions] == [("digits", "1"), ("digits", "2")]
    every = client.get_inference_statistics()["model_stats"]
    assert {m["name"] for m in every} == {"digits", "gather"}


def test_http_stats_unknown_model_is_404(server):
    r = httpx.get(f"http://{server}/v2/models/nope/stats")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = httpx.get(f"http://{server}/v2/models/digits/versions/9/stats")
    assert r.status_code == 404
