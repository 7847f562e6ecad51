"""TensorRT backend: pure-Python parts (cache key, profile shapes); the engine with TensorRT."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from runtime_models import dense_relu_model, dense_relu_reference

from bnexport.errors import InputError
from bnexport.runtime.engine_cache import (
    EngineCache,
    cache_dir,
    engine_cache_key,
    profile_shapes,
    timing_cache_path,
)
from bnexport.runtime.io_check import TensorInfo

F32 = np.dtype(np.float32)
BASE = dict(model_bytes=b"onnx", trt_version="10.9.0", gpu_name="NVIDIA H100", flags={"a": 1})


def test_cache_key_is_stable_and_sensitive():
    key = engine_cache_key(**BASE)
    assert key == engine_cache_key(**BASE) and len(key) == 64
    variants = [
        {**BASE, "model_bytes": b"onnx2"},
        {**BASE, "trt_version": "10.10.0"},
        {**BASE, "gpu_name": "NVIDIA A100"},
        {**BASE, "flags": {"a": 2}},
        {**BASE, "flags": {"a": 1, "fp16": True}},
    ]
    keys = {engine_cache_key(**v) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    # flag order does not matter
    assert engine_cache_key(**{**BASE, "flags": {"x": 1, "y": 2}}) == engine_cache_key(
        **{**BASE, "flags": {"y": 2, "x": 1}}
    )


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BNEXPORT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BNEXPORT_CACHE_DIR")
    assert cache_dir().parts[-3:] == (".cache", "bnexport", "engines")
    assert timing_cache_path("10.9", "NVIDIA H100 80GB", tmp_path).name == (
        "timing-10.9-NVIDIA_H100_80GB.cache"
    )


def test_engine_cache_roundtrip(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    assert cache.get("k") is None
    path = cache.put("k", b"\x00engine")
    assert path.read_bytes() == b"\x00engine" and cache.get("k") == b"\x00engine"
    assert [p.name for p in path.parent.iterdir()] == ["k.engine"]  # no temp file left


def test_profile_shapes():
    inputs = [
        TensorInfo("img", F32, (None, 3, 32, 32)),
        TensorInfo("fixed", F32, (2, 5)),
    ]
    shapes = profile_shapes(inputs, max_batch=16, opt_batch=4)
    assert shapes["img"] == ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
    assert shapes["fixed"] == ((2, 5), (2, 5), (2, 5))
    assert profile_shapes(inputs, 8)["img"][1] == (8, 3, 32, 32)  # opt defaults to max


def test_profile_shapes_errors():
    seq = [TensorInfo("tokens", F32, (None, None))]
    with pytest.raises(InputError, match=r"input 'tokens' .* dynamic dimension\(s\) \[1\]"):
        profile_shapes(seq, 4)
    over = {"tokens": ((1, 1), (4, 64), (8, 128))}
    assert profile_shapes(seq, 8, overrides=over)["tokens"] == over["tokens"]
    with pytest.raises(InputError, match="max_batch must be >= 1"):
        profile_shapes(seq, 0)
    with pytest.raises(InputError, match="opt_batch must be in"):
        profile_shapes([TensorInfo("x", F32, (None, 2))], 4, opt_batch=5)


def _has_trt_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from bnexport.cuda_api import runtime
    from bnexport.errors import BackendUnavailableError

    try:
        runtime()  # loads the runtime API and needs >= 1 device
    except BackendUnavailableError:
        return False
    return True


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.needs(
    "tensorrt",
    "cuda_gpu",
    unverified="engine build, profile, engine cache hit and device execution",
)
@pytest.mark.parametrize(
    ("precision", "rtol", "atol"), [("fp32", 1e-5, 1e-5), ("fp16", 1e-2, 1e-2)]
)
def test_tensorrt_engine_runs_and_caches(tmp_path, monkeypatch, precision, rtol, atol):
    from bnexport.runtime import Session

    monkeypatch.setenv("BNEXPORT_CACHE_DIR", str(tmp_path))
    x = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)
    sess = Session(
        dense_relu_model(), backend="tensorrt", device="cuda", precision=precision, max_batch=4
    )
    assert sess._impl.from_cache is False
    out = sess.run(x)  # 11 samples: split into 4 + 4 + 3
    ref = dense_relu_reference(x)
    for name in ("y", "z"):
        np.testing.assert_allclose(out[name], ref[name], rtol=rtol, atol=atol)
    again = Session(
        dense_relu_model(), backend="tensorrt", device="cuda", precision=precision, max_batch=4
    )
    assert again._impl.from_cache is True
    np.testing.assert_array_equal(again.run(x)["y"], out["y"])
