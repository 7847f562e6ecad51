"""CI check: a fresh venv with only ``bnexport[serve]`` runs fold, run, serve (and more).

Usage: ``python3 tests/lean_install_check.py [--venv DIR] [--keep]``. Exit 0 when:

1. ``pip install ".[serve]"`` (a real, non-editable install) brings no TensorFlow, Keras,
   tf2onnx, tf-keras, scikit-learn or matplotlib;
2. ``bnexport fold`` folds a MatMul+BatchNormalization graph and ``bnexport run`` computes
   what NumPy computes (float32 graph vs float64 reference, max abs error < 1e-4);
   ``bnexport triton-repo`` and ``bnexport quantize`` run;
3. ``bnexport serve`` starts, answers ``/v2/health/ready``, serves one KServe v2 JSON
   inference with the same numbers, and stops on SIGTERM;
4. the training side says which extra it needs, in one line (``bnexport quickstart``,
   ``bnexport.BatchNormalization``).

It runs outside the repository folder, so only the installed package is imported. Not
collected by pytest (no ``test_`` prefix): ``.ci/run`` calls it after the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "tf2onnx", "tf_keras", "sklearn", "matplotlib")

MAKE_MODEL = r"""
import json
import numpy as np, onnx, onnx.parser, onnx.numpy_helper as nh
model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
lean (float[N,3] x) => (float[N,2] y) {
  h = MatMul(x, W)
  y = BatchNormalization(h, s, b, m, v)
}''')
rng = np.random.default_rng(0)
arrays = dict(W=rng.normal(size=(3, 2)), s=rng.uniform(0.5, 2, 2), b=rng.normal(size=2),
              m=rng.normal(size=2), v=rng.uniform(0.5, 2, 2))
for k, a in arrays.items():
    model.graph.initializer.append(nh.from_array(a.astype(np.float32), k))
onnx.save(model, "lean.onnx")
x = rng.normal(size=(4, 3)).astype(np.float32)
np.save("x.npy", x)
h = x.astype(np.float64) @ arrays["W"]
ref = (h - arrays["m"]) / np.sqrt(arrays["v"] + 1e-5) * arrays["s"] + arrays["b"]
np.save("ref.npy", ref)
with open("io.json", "w") as fh:  # for the stdlib-only HTTP client below
    json.dump({"x": x.tolist(), "ref": ref.tolist()}, fh)
"""

COMPARE = r"""
import sys, numpy as np
ref = np.load("ref.npy")
with np.load("y.npz") as data:
    err = float(np.abs(data["y"] - ref).max())
print(f"max abs error {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
"""


def _step(title: str) -> None:
    print(f"--- {title}", flush=True)


def _run(argv: list[str], cwd: Path, *, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != expect:
        sys.exit(
            f"FAILED: {' '.join(argv)} exited {proc.returncode} (expected {expect})\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read() or b"{}")


def _serve(bindir: Path, work: Path) -> None:
    port = _free_port()
    argv = [str(bindir / "bnexport"), "serve", "folded.onnx", "--port", str(port)]
    server = subprocess.Popen(
        argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                sys.exit(
                    f"FAILED: serve exited {server.returncode}: {server.stderr.read()[-3000:]}"
                )
            try:
                if _http(f"{base}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("FAILED: serve not ready after 120 s")
            time.sleep(0.5)
        io = json.loads((work / "io.json").read_text())
        x, ref = io["x"], io["ref"]
        flat = [v for row in x for v in row]
        request = {"inputs": [{"name": "x", "shape": [len(x), len(x[0])], "datatype": "FP32"}]}
        request["inputs"][0]["data"] = flat
        status, reply = _http(f"{base}/v2/models/folded/infer", request)
        out = {o["name"]: o for o in reply["outputs"]}["y"]
        expected = [v for row in ref for v in row]
        if out["shape"] != [len(ref), len(ref[0])] or len(out["data"]) != len(expected):
            sys.exit(f"FAILED: serve answered shape {out['shape']}")
        err = max(abs(a - b) for a, b in zip(out["data"], expected, strict=True))
        print(f"serve: HTTP {status}, max abs error {err:.2e}")
        if status != 200 or err >= 1e-4:
            sys.exit("FAILED: serve answered wrong numbers")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            sys.exit("FAILED: serve did not stop within 60 s of SIGTERM")
    if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        sys.exit(f"FAILED: serve exited {code} after SIGTERM: {server.stderr.read()[-2000:]}")
    print(f"serve: stopped on SIGTERM (exit {code})")


def main() -> int:
    """Build the lean venv and run the checks; exit non-zero with a reason on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", help="venv folder (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the venv and work folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bnexport-lean-"))
    venv = Path(args.venv) if args.venv else tmp / "venv"
    work = tmp / "work"
    work.mkdir()
    bindir = venv / "bin"
    py = str(bindir / "python")
    start = time.monotonic()
    try:
        _step(f"fresh venv {venv} with {ROOT}[serve]")
        if not (bindir / "python").exists():
            _run([sys.executable, "-m", "venv", str(venv)], tmp)
        _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], tmp)
        _run([py, "-m", "pip", "install", "-q", f"{ROOT}[serve]"], tmp)
        # a reused --venv already has bnexport 0.1.0: install this checkout's code anyway
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)], tmp)

        _step("no training-side packages installed")
        probe = (
            "import importlib.util, json; "
            f"print(json.dumps([m for m in {HEAVY!r} if importlib.util.find_spec(m)]))"
        )
        found = json.loads(_run([py, "-c", probe], work).stdout)
        if found:
            sys.exit(f"FAILED: the [serve] install brought {found}")

        _step("bnexport fold / run")
        _run([py, "-c", MAKE_MODEL], work)
        bnexport = str(bindir / "bnexport")
        print(_run([bnexport, "fold", "lean.onnx", "-o", "folded.onnx"], work).stdout.strip())
        _run([bnexport, "run", "folded.onnx", "-i", "x.npy", "-o", "y.npz"], work)
        print(_run([py, "-c", COMPARE], work).stdout.strip())

        _step("bnexport triton-repo / quantize")
        _run([bnexport, "triton-repo", "folded.onnx", "repo"], work)
        if not (work / "repo" / "folded" / "config.pbtxt").is_file():
            sys.exit("FAILED: triton-repo wrote no config.pbtxt")
        _run([bnexport, "quantize", "lean.onnx", "-o", "int8.onnx", "--calibration", "x.npy"], work)
        print("triton-repo and quantize: ok")

        _step("bnexport serve")
        _serve(bindir, work)

        _step("the training side names its extra")
        proc = _run([bnexport, "quickstart", "--out-dir", "qs"], work, expect=2)
        lines = proc.stderr.strip().splitlines()
        if len(lines) != 1 or "bnexport[keras]" not in lines[0]:
            sys.exit(f"FAILED: quickstart without keras said: {proc.stderr}")
        print(lines[0])
        attr = (
            "import bnexport\n"
            "try:\n    bnexport.BatchNormalization\nexcept ImportError as e:\n    print(e)"
        )
        message = _run([py, "-c", attr], work).stdout.strip()
        if "bnexport[keras]" not in message:
            sys.exit(f"FAILED: bnexport.BatchNormalization without keras said: {message!r}")
        print(message)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"lean install check passed in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
