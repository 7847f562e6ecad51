"""``bnexport run``: outputs vs NumPy (fp32: rtol 1e-5, atol 1e-6) and exit codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnexport.cli.main import main

W = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)


@pytest.fixture
def model_path(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "mm",
        [x],
        [y],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "mm.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_run_writes_outputs(model_path, tmp_path, fmt, capsys):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    src = tmp_path / f"in.{fmt}"
    np.save(src, x) if fmt == "npy" else np.savez(src, x=x)
    out = tmp_path / "out.npz"
    argv = ["run", str(model_path), "--input", str(src), "--output", str(out), "--max-batch", "2"]
    assert main(argv) == 0
    with np.load(out) as data:
        assert data.files == ["y"]
        np.testing.assert_allclose(data["y"], x.astype(np.float64) @ W, rtol=1e-5, atol=1e-6)
    assert "wrote 1 output(s)" in capsys.readouterr().out


def test_run_prints_summary(model_path, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    assert main(["run", str(model_path), "-i", str(tmp_path / "x.npy")]) == 0
    assert "y: float32[3, 2]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_input_file", "inputs file not found"),
        ("bad_shape", "input 'x': dimension 1 must be 4"),
        ("unknown_name", "unknown input(s) ['z']"),
        ("missing_model", "ONNX model not found"),
        ("bad_output", "--output must end in .npz"),
    ],
)
def test_run_usage_errors_exit_2(model_path, tmp_path, capsys, setup, message):
    inp = tmp_path / "x.npy"
    np.save(inp, np.ones((3, 4), np.float32))
    model, out = str(model_path), None
    if setup == "missing_input_file":
        inp = tmp_path / "nope.npy"
    elif setup == "bad_shape":
        np.save(inp, np.ones((3, 5), np.float32))
    elif setup == "unknown_name":
        inp = tmp_path / "d.npz"
        np.savez(inp, z=np.ones((3, 4), np.float32))
    elif setup == "missing_model":
        model = str(tmp_path / "none.onnx")
    elif setup == "bad_output":
        out = str(tmp_path / "out.txt")
    argv = ["run", model, "--input", str(inp)] + (["--output", out] if out else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnexport run: error:") and message in err


@pytest.mark.needs_absent("tensorrt", why="checks the refusal without tensorrt")
def test_tensorrt_backend_unavailable_exits_2_with_the_extra(model_path, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    argv = ["run", str(model_path), "-i", str(tmp_path / "x.npy"), "--backend", "tensorrt"]
    assert main(argv + ["--device", "cuda"]) == 2  # a missing extra: an unusable request
    assert 'pip install "bnexport[tensorrt]"' in capsys.readouterr().err


def test_run_prints_latency_over_timed_runs(model_path, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["run", str(model_path), "--inputs", str(tmp_path / "x.npy")]
    assert main(argv + ["--runs", "4", "--warmup", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    # outputs summarized against NumPy (fp32 MatMul of 4 terms: atol 1e-5 on 4 significant digits)
    ref = x.astype(np.float64) @ W.astype(np.float64)
    assert out[0].startswith("y: float32[3, 2] ")
    assert float(out[0].split("max ")[1].split()[0]) == pytest.approx(ref.max(), abs=1e-3)
    assert out[1].startswith("latency: median ") and " p90 " in out[1]
    assert out[2].strip() == "(4 timed run(s); 2 warmup run(s) excluded)"
    assert main(argv + ["-q"]) == 0  # -q: the outputs only
    assert "latency" not in capsys.readouterr().out
    for bad in (["--runs", "0"], ["--warmup", "-1"]):
        assert main(argv + bad) == 2


def test_latency_excludes_the_warmup_runs():
    """A slow first run (allocation, engine setup) must not enter median or p90."""
    from bnexport.cli.cmd_run import _timed_runs, latency_line

    now = [0.0]
    durations = iter([5.0, 5.0] + [0.001 * (i + 1) for i in range(10)])  # 2 slow warmups

    class FakeSession:
        calls = 0

        def run(self, feed):
            FakeSession.calls += 1
            now[0] += next(durations)
            return {"y": feed["x"]}

    outputs, seconds = _timed_runs(FakeSession(), {"x": 1}, runs=10, warmup=2, clock=lambda: now[0])
    assert FakeSession.calls == 12 and outputs == {"y": 1}
    np.testing.assert_allclose(seconds, [0.001 * (i + 1) for i in range(10)], rtol=1e-9)
    line = latency_line(seconds, 2)
    # NumPy reference: median 5.5 ms, p90 (linear) 9.1 ms, min 1 ms, mean 5.5 ms
    assert "median 5.500 ms, p90 9.100 ms, min 1.000 ms, mean 5.500 ms" in line
