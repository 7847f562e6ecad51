"""benchmarks/gpu_check.{sh,py}: what can be checked without a GPU (syntax, paths, the math)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bnexport_plugins.fused_norm.gpu_runtime import gpu_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
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


@pytest.mark.skipif(
    gpu_unavailable_reason() is None, reason="a GPU is present: gpu_check.sh runs the real check"
)
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
