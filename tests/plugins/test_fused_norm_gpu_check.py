"""benchmarks/gpu_check.{sh,py}: what can be checked without a GPU (syntax, paths, the math)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check.py")


def test_shell_script_syntax_and_paths():
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    paths = set(re.findall(r"(?:tests|benchmarks)/[\w/]+\.py", text))
    assert {"benchmarks/kernel_bench.py", "benchmarks/gpu_check.py"} <= paths
    missing = [p for p in sorted(paths) if not (ROOT / p).is_file()]
    assert not missing, f"gpu_check.sh names files that do not exist: {missing}"
    assert "test_fused_norm_gpu_kernel.py" in text and "--json" in text


def test_affine_params_are_eval_batch_norm(gpu_check):
    """x·scale + shift == (x − μ)/√(var + ε)·γ + β, the formula torch's eval mode computes."""
    rng = np.random.default_rng(0)
    c = 16
    mean, var = rng.standard_normal(c) * 5, rng.uniform(0.1, 9.0, c)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    x = rng.standard_normal((4, c, 3, 3)) * 3 + 5
    scale, shift = gpu_check.affine_params(mean, var, gamma, beta, 1e-3)
    assert scale.dtype == np.float32 and shift.dtype == np.float32
    b = (slice(None), None, None)
    got = x * scale[b].astype(np.float64) + shift[b].astype(np.float64)
    want = (x - mean[b]) / np.sqrt(var[b] + 1e-3) * gamma[b] + beta[b]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)  # float32 parameters


def test_expected_running_matches_a_training_step(gpu_check):
    """torch's update uses the unbiased variance of the batch; ours reports the biased one."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 5, 4, 4)) + 2
    axes = (0, 2, 3)
    count = x.size // 5
    r_mean, r_var = rng.standard_normal(5), rng.uniform(1, 2, 5)
    got_mean, got_var = gpu_check.expected_running(
        (r_mean, r_var), (x.mean(axis=axes), x.var(axis=axes)), count
    )
    np.testing.assert_allclose(got_mean, 0.9 * r_mean + 0.1 * x.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(got_var, 0.9 * r_var + 0.1 * x.var(axis=axes, ddof=1), rtol=1e-12)


def test_summarize_junit(gpu_check, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="2">'
        "</testsuite></testsuites>"
    )
    assert gpu_check.summarize_junit(xml) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}
    assert gpu_check.summarize_junit(tmp_path / "missing.xml") is None


@pytest.mark.needs_absent("cuda_gpu", why="a GPU is present: gpu_check.sh runs the real check")
@pytest.mark.parametrize("script", ["gpu_check.py", "kernel_bench.py"])
def test_without_gpu_exit_2_with_the_reason(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--sizes-mib", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr
    assert "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------- timing without Python, deps
@pytest.fixture(scope="module")
def kernel_bench():
    return _load("kernel_bench.py")


class _FakeTimingDriver:
    """Records the driver calls of DeviceTimer; events 'elapse' 1 ms per replayed call."""

    def __init__(self):
        self.log: list[str] = []
        self.capturing = False
        self.captured = 0
        self.CUstreamCaptureMode = types.SimpleNamespace(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1)

    def __getattr__(self, name):
        def call(*args):
            self.log.append(name)
            if name == "cuStreamBeginCapture":
                self.capturing = True
            elif name == "cuStreamEndCapture":
                self.capturing = False
                return 0, "graph"
            elif name == "cuEventElapsedTime":  # 1 ms per call enqueued or replayed
                end = len(self.log) - 1 - self.log[::-1].index("cuEventRecord")
                start = end - 1 - self.log[:end][::-1].index("cuEventRecord")
                window = self.log[start + 1 : end]
                calls = window.count("cuGraphLaunch") * self.captured + window.count("enqueue")
                return 0, float(calls)
            elif name in ("cuStreamCreate", "cuEventCreate", "cuGraphInstantiate"):
                return 0, name
            return (0,)

        return call

    def enqueue(self):
        self.log.append("enqueue")
        if self.capturing:
            self.captured += 1


def test_device_timer_times_graph_replays_only(kernel_bench):
    """The timed window of ``ms`` holds graph replays only: no argument building, no Python."""
    from bnexport.cuda_api import check

    drv = _FakeTimingDriver()
    timer = kernel_bench.DeviceTimer(drv, check, reps=5)
    result = timer.measure(drv.enqueue, iters=4)
    assert drv.captured == 5  # one graph of `reps` back-to-back calls
    assert set(result) == {"ms", "eager_ms", "launch_us", "overhead_us"}
    assert result["ms"] == pytest.approx(1.0)  # 5 calls replayed: 5 ms / 5 per call
    assert result["eager_ms"] == pytest.approx(1.0) and result["overhead_us"] == 0.0
    log = drv.log
    begin = log.index("cuStreamEndCapture")
    windows, i = [], begin
    while "cuEventRecord" in log[i:]:
        start = log.index("cuEventRecord", i)
        end = log.index("cuEventRecord", start + 1)
        windows.append(log[start + 1 : end])
        i = end + 1
    assert windows and all(w == ["cuGraphLaunch"] for w in windows)
    assert log[-2:] == ["cuGraphExecDestroy", "cuGraphDestroy"]


def test_dependency_check_names_missing_and_carried(gpu_check, tmp_path, monkeypatch):
    wheels = tmp_path / "w"
    wheels.mkdir()
    (wheels / "ml_dtypes-0.7.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / "bnexport-0.1.0-py3-none-any.whl").write_bytes(b"")
    present = {"numpy", "pytest", "pluggy", "iniconfig", "packaging", "pygments", "torch"}
    present |= {"cuda.bindings", "cuda.pathfinder"}
    monkeypatch.setattr(gpu_check, "_find", lambda module: module in present)
    monkeypatch.setattr(gpu_check, "_version", lambda dist: "13.0.0")
    monkeypatch.setattr(gpu_check.sys, "version_info", (3, 12, 0))
    lines, install, fatal = gpu_check.check_dependencies(wheels, probe=False)
    assert install == ["ml-dtypes", "bnexport"] and not fatal
    present.discard("numpy")  # numpy is never carried: torch's own, or nothing
    _, install, fatal = gpu_check.check_dependencies(wheels, probe=False)
    assert [f.split()[0] for f in fatal] == ["numpy"]
    assert gpu_check.wheel_for("cuda-bindings", wheels) is None
    assert all("numpy" not in r.dist or not r.carry for r in gpu_check.REQUIREMENTS)


def test_dry_run_prints_the_steps_in_order(tmp_path):
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^\[dry-run\] (\w+)", out.stdout, re.M)
    assert [s for s in steps if s != "install"][:5] == [
        "deps_after",
        "env",
        "gpu_tests",
        "kernel_bench",
        "gpu_check",
    ]
    assert "=== deps" in out.stdout and not (tmp_path / "out" / "summary.json").exists()
