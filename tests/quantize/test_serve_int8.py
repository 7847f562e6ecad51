"""The KServe v2 server serves an INT8 graph like any ONNX file."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from fastapi.testclient import TestClient
from qmodels import fp32_reference, images

import bnexport
from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.rest.app import create_app


def test_server_serves_int8_model(tmp_path, cnn_path, calib):
    path = tmp_path / "cnn_int8.onnx"
    bnexport.quantize(cnn_path, path, calib, target="cpu")  # CPU serving: right on every x86
    x = images(3, seed=11)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    app = create_app(ModelRepository.from_path(path, max_batch=8))
    with TestClient(app) as client:
        assert client.get("/v2/models/cnn_int8/ready").status_code == 200
        resp = client.post("/v2/models/cnn_int8/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    got = np.array(out["data"], np.float32).reshape(out["shape"])
    # exactly what onnxruntime computes on the int8 graph (same kernels, batch of 3)
    direct = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-6)
    fp32 = fp32_reference(x)["logits"]
    assert np.abs(got - fp32).max() <= 0.15 * np.abs(fp32).max()
