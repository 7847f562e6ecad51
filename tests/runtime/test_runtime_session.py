"""Session on small onnx.helper graphs vs NumPy (fp32 tolerance: rtol=1e-5, atol=1e-6)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from runtime_models import dense_relu_model, dense_relu_reference, two_input_model

from bnexport.errors import BackendUnavailableError, InputError, UsageError
from bnexport.runtime import Session, TensorInfo

RTOL, ATOL = 1e-5, 1e-6  # float32 matmul of 4 terms vs float64 NumPy


@pytest.fixture(scope="module")
def sess() -> Session:
    return Session(dense_relu_model())


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_metadata(sess):
    assert sess.backend == "onnxruntime"
    assert sess.inputs == [TensorInfo("x", np.dtype(np.float32), (None, 4))]
    assert [o.name for o in sess.outputs] == ["y", "z"]
    assert sess.outputs[0].shape == (None, 3)


@pytest.mark.parametrize("as_dict", [True, False])
def test_run_matches_numpy(sess, as_dict):
    x = _x(5)
    out = sess.run({"x": x} if as_dict else x)
    ref = dense_relu_reference(x)
    assert list(out) == ["y", "z"]
    for name in ("y", "z"):
        assert out[name].dtype == np.float32 and out[name].shape == (5, 3)
        np.testing.assert_allclose(out[name], ref[name], rtol=RTOL, atol=ATOL)


def test_from_path(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(dense_relu_model(), path)
    with Session(str(path)) as sess:
        out = sess.run(_x(2))
    np.testing.assert_allclose(out["y"], dense_relu_reference(_x(2))["y"], rtol=RTOL, atol=ATOL)


def test_safe_casts_are_applied(sess):
    x64 = _x(3).astype(np.float64)
    out = sess.run(x64)  # float -> float: cast to the model's float32
    np.testing.assert_allclose(out["y"], dense_relu_reference(x64)["y"], rtol=RTOL, atol=ATOL)
    xu8 = np.arange(12, dtype=np.uint8).reshape(3, 4)  # uint8 -> float32 is safe
    out = sess.run(xu8)
    np.testing.assert_allclose(out["z"], dense_relu_reference(xu8)["z"], rtol=RTOL, atol=1e-4)
    out = sess.run([[1.0, 2.0, 3.0, 4.0]])  # nested lists are arrays too
    assert out["y"].shape == (1, 3)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (
            {"x": np.zeros((2, 4), np.float32), "extra": np.zeros(1)},
            r"unknown input\(s\) \['extra'\].*x: float32\[\?, 4\]",
        ),
        ({}, r"missing input\(s\): x: float32\[\?, 4\]"),
        (
            {"x": np.zeros((2, 4, 1), np.float32)},
            r"input 'x': expected rank 2 .*received shape \(2, 4, 1\)",
        ),
        ({"x": np.zeros((2, 5), np.float32)}, r"input 'x': dimension 1 must be 4"),
        (
            {"x": np.zeros((2, 4), np.int64)},
            r"input 'x': the model expects float32, received int64",
        ),
        ({"x": np.array([["a"] * 4])}, r"input 'x': expected a numeric array"),
    ],
)
def test_input_errors_name_the_input(sess, inputs, match):
    with pytest.raises(InputError, match=match):
        sess.run(inputs)


def test_integer_casts():
    sess = Session(two_input_model())
    a = np.ones((2, 2), np.float32)
    out = sess.run({"a": a, "b": np.array([[1, 2], [3, 4]], dtype=np.int32)})  # int32 -> int64 safe
    np.testing.assert_array_equal(out["s"], [[2, 3], [4, 5]])
    with pytest.raises(InputError, match="has 2 inputs"):
        sess.run(a)
    with pytest.raises(InputError, match=r"input 'b': the model expects int64, received float32"):
        sess.run({"a": a, "b": a})


def test_integer_range_check():
    from bnexport.runtime.io_check import check_inputs

    info = [TensorInfo("ids", np.dtype(np.int32), (None,))]
    ok = check_inputs({"ids": np.array([1, 2], np.int64)}, info)
    assert ok["ids"].dtype == np.int32
    with pytest.raises(InputError, match=r"input 'ids': values in .* do not fit"):
        check_inputs({"ids": np.array([2**40], np.int64)}, info)


@pytest.mark.parametrize("max_batch", [1, 3, 7])
def test_max_batch_split_equals_single_run(sess, max_batch):
    x = _x(10, seed=3)
    whole = sess.run(x)
    split = Session(dense_relu_model(), max_batch=max_batch).run(x)
    for name in whole:
        assert split[name].shape == whole[name].shape
        np.testing.assert_allclose(split[name], whole[name], rtol=RTOL, atol=ATOL)


def test_split_needs_a_common_batch():
    sess = Session(two_input_model(), max_batch=1)
    with pytest.raises(InputError, match="do not share one leading"):
        sess.run({"a": np.ones((2, 2), np.float32), "b": np.ones((3, 2), np.int64)})


def test_thread_safety_smoke(sess):
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(25):
                x = _x(1 + (seed + i) % 6, seed=seed * 100 + i)
                out = sess.run(x)
                np.testing.assert_allclose(
                    out["y"], dense_relu_reference(x)["y"], rtol=RTOL, atol=ATOL
                )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "tvm"}, UsageError, r"backend='tvm'"),
        ({"precision": "int8"}, UsageError, r"precision='int8'"),
        ({"max_batch": 0}, UsageError, r"max_batch=0"),
        ({"precision": "fp16"}, BackendUnavailableError, r"precision='fp16' on device='cpu'"),
        ({"backend": "tensorrt"}, BackendUnavailableError, r"device='cuda'"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Session(dense_relu_model(), **kwargs)


@pytest.mark.needs_absent("tensorrt", why="checks the error without tensorrt")
def test_tensorrt_missing_is_reported():
    with pytest.raises(BackendUnavailableError, match="needs the tensorrt package"):
        Session(dense_relu_model(), backend="tensorrt", device="cuda")


@pytest.mark.needs_absent("onnxruntime_gpu", why="the error path cannot be reached")
def test_cuda_without_onnxruntime_gpu():
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Session(dense_relu_model(), backend="onnxruntime", device="cuda")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        Session(tmp_path / "nope.onnx")


def test_runtime_never_imports_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "import bnexport\n"
        "from bnexport.runtime import Session\n"
        "import bnexport.runtime.ort_backend, bnexport.runtime.trt_backend\n"
        "import bnexport.runtime.engine_cache, bnexport.runtime.io_check\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from runtime_models import dense_relu_model\n"
        "s = bnexport.Session(dense_relu_model())\n"
        "s.run(np.zeros((1, 4), np.float32))\n"
        "heavy = ('tensorflow', 'keras', 'tf_keras')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    import os

    here = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, "-c", code, here], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_unknown_rank_is_not_checked_but_cast():
    from bnexport.runtime.io_check import check_inputs

    info = [TensorInfo("t", np.dtype(np.float32), None)]
    assert info[0].describe() == "t: float32[unknown rank]"
    out = check_inputs({"t": np.zeros((2, 3, 4))}, info)
    assert out["t"].dtype == np.float32 and out["t"].shape == (2, 3, 4)


def test_lazy_top_level_export():
    import bnexport

    assert bnexport.Session is Session


@pytest.mark.parametrize("max_batch", [None, 3])
def test_run_options_reach_onnxruntime(max_batch):
    """RunOptions are passed to every onnxruntime run, split chunks included."""
    import onnxruntime as ort

    sess = Session(dense_relu_model(), max_batch=max_batch)
    x = _x(7, seed=4)
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    out = sess.run(x, run_options=shrink)
    ref = dense_relu_reference(x)
    for name in ("y", "z"):
        np.testing.assert_allclose(out[name], ref[name], rtol=RTOL, atol=ATOL)
    stop = ort.RunOptions()
    stop.terminate = True  # onnxruntime refuses to start a run with this flag
    with pytest.raises(Exception, match="terminate"):
        sess.run(x, run_options=stop)
    np.testing.assert_allclose(sess.run(x)["y"], ref["y"], rtol=RTOL, atol=ATOL)
