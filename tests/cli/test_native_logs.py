"""TensorFlow's native log lines: silenced by the CLI, replayed when the import fails.

A fake ``tensorflow`` package that writes to file descriptor 2 from ``os.write`` (as
TensorFlow's C++ does while its libraries load) stands in for the real one, so these
run in a second each; the real TensorFlow is checked end to end through ``export``
(tests/cli/test_cli_export.py) and ``parity`` below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE_LINE = "E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)"


def _fake_tensorflow(tmp_path: Path, *, fail: bool) -> Path:
    pkg = tmp_path / "fake" / "tensorflow"
    pkg.mkdir(parents=True)
    body = f"import os\nos.write(2, b{(NATIVE_LINE + chr(10))!r})\n"
    if fail:
        body += "raise ImportError('libtensorflow_framework.so.2: cannot open shared object')\n"
    (pkg / "__init__.py").write_text(body)
    return pkg.parent


def _run(code: str, tmp_path: Path, *, fail: bool, env: dict | None = None):
    path = os.pathsep.join([str(_fake_tensorflow(tmp_path, fail=fail)), str(ROOT)])
    base = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**base, "PYTHONPATH": path, **(env or {})},
        timeout=60,
    )


QUIET = (
    "import os\n"
    "from bnexport.cli.native_logs import quiet_native_logs\n"
    "print(quiet_native_logs(verbose={verbose}))\n"
    "import tensorflow\n"
    "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), os.environ.get('GRPC_VERBOSITY'))\n"
)


def test_native_lines_while_tensorflow_loads_are_silenced(tmp_path):
    proc = _run(QUIET.format(verbose=False), tmp_path, fail=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.split() == ["True", "3", "ERROR"]


def test_verbose_changes_nothing(tmp_path):
    proc = _run(QUIET.format(verbose=True), tmp_path, fail=False)
    assert proc.returncode == 0
    assert NATIVE_LINE in proc.stderr
    assert proc.stdout.split() == ["False", "None", "None"]


def test_a_level_the_user_set_is_kept(tmp_path):
    proc = _run(
        QUIET.format(verbose=False), tmp_path, fail=False, env={"TF_CPP_MIN_LOG_LEVEL": "0"}
    )
    assert NATIVE_LINE in proc.stderr  # their choice: descriptor 2 is left alone
    assert proc.stdout.split() == ["False", "0", "ERROR"]


def test_a_failing_import_replays_what_it_wrote(tmp_path):
    proc = _run(QUIET.format(verbose=False), tmp_path, fail=True)
    assert proc.returncode == 1
    assert NATIVE_LINE in proc.stderr  # the lines may say why TensorFlow did not load
    assert "cannot open shared object" in proc.stderr


def test_cli_sets_nothing_for_the_python_api(tmp_path):
    """Importing bnexport (the library) changes no environment variable."""
    code = "import os, bnexport\nprint(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\n"
    proc = _run(code, tmp_path, fail=False)
    assert proc.stdout.split() == ["None"]


@pytest.mark.slow
def test_parity_cli_prints_no_tensorflow_line(tmp_path):
    """The real TensorFlow, a fresh process: parity's output is the report only."""
    import keras

    import bnexport

    inp = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    model = keras.Model(inp, keras.layers.BatchNormalization(name="bn")(x))
    model.save(tmp_path / "m.keras")
    bnexport.export(model, tmp_path / "m.onnx")
    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")
    }
    argv = [sys.executable, "-m", "bnexport", "parity", str(tmp_path / "m.keras")]
    proc = subprocess.run(
        argv + [str(tmp_path / "m.onnx"), "--samples", "2"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "80"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
