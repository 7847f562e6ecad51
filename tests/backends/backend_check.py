"""Export and verify keras.applications models on the current Keras backend, no TensorFlow.

Run by ``tests/backends/test_backends.py`` with a backend venv's interpreter
(:mod:`backend_venv`) and ``KERAS_BACKEND`` set; prints one JSON object as its last line.
Not collected by pytest (no ``test_`` prefix), and it imports nothing from the tree: the
venv's installed bnexport is what runs.

Per model (``weights=None``, 10 classes, logits, per-channel BN statistics randomized
with a fixed seed so that a fold on the wrong axis shows):

1. ``bnexport.export(model, path)`` with the default engine and verification;
2. an independent check: the written file in onnxruntime with graph optimizations off,
   on other inputs (seed 7, batch 3) than the exporter's, against the Keras model's own
   forward pass (``training=False``); float32 tolerance
   ``max|onnx − keras| <= 1e-4·max|keras| + 1e-5``;
3. for the models named by ``--keras-file``: ``model.save(x.keras)``, then
   ``bnexport.export("x.keras")`` and the CLI (``python -m bnexport export x.keras -o
   y.onnx``) on that file.

Finally it reports whether ``tensorflow``, ``tf2onnx`` or ``tf_keras`` was ever imported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEAVY = ("tensorflow", "tf2onnx", "tf_keras")
#: float32: max|onnx − keras| <= RTOL·max|keras| + ATOL (as tests/export/export_models.TOL)
RTOL, ATOL = 1e-4, 1e-5


def randomize_bn(model, seed: int = 0) -> int:
    """Per-channel statistics on every BatchNormalization; returns how many."""
    import keras

    rng = np.random.default_rng(seed)
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        shape = tuple(layer.moving_mean.shape)
        layer.moving_mean.assign(rng.normal(0.0, 0.05, shape).astype(np.float32))
        layer.moving_variance.assign(rng.uniform(0.8, 1.25, shape).astype(np.float32))
        layer.gamma.assign(rng.uniform(0.8, 1.2, shape).astype(np.float32))
        layer.beta.assign(rng.normal(0.0, 0.05, shape).astype(np.float32))
        count += 1
    return count


def onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_model(name: str, size: int, workdir: Path, keras_file: bool) -> dict:
    """Steps 1-3 of the module doc for one model; one JSON-ready row."""
    import keras
    import onnx

    import bnexport

    keras.utils.set_random_seed(0)
    ctor = getattr(keras.applications, name)
    model = ctor(input_shape=(size, size, 3), weights=None, classes=10, classifier_activation=None)
    bns = randomize_bn(model)
    path = workdir / f"{name}.onnx"
    t = time.perf_counter()
    report = bnexport.export(model, path)
    export_s = time.perf_counter() - t
    x = np.random.default_rng(7).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    ref = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)
    got = np.asarray(onnx_outputs(path, x), np.float64)
    graph = onnx.load(str(path))
    row = {
        "model": name,
        "bn_layers": bns,
        "engine": getattr(report, "engine", None),
        "fallback_reason": getattr(report, "fallback_reason", None),
        "summary": report.summary,
        "verified": bool(report.verify is not None and report.verify.passed),
        "nodes": len(graph.graph.node),
        "ops": sorted({n.op_type for n in graph.graph.node}),
        "max_abs_err": float(np.max(np.abs(got - ref))),
        "max_abs_ref": float(np.max(np.abs(ref))),
        "bound": RTOL * float(np.max(np.abs(ref))) + ATOL,
        "export_s": round(export_s, 2),
    }
    if keras_file:
        saved = workdir / f"{name}.keras"
        model.save(saved)
        from_file = workdir / f"{name}_file.onnx"
        file_report = bnexport.export(str(saved), from_file)
        file_got = np.asarray(onnx_outputs(from_file, x), np.float64)
        row["file_engine"] = getattr(file_report, "engine", None)
        row["file_verified"] = bool(file_report.verify is not None and file_report.verify.passed)
        row["file_max_abs_err"] = float(np.max(np.abs(file_got - ref)))
        cli_out = workdir / f"{name}_cli.onnx"
        proc = subprocess.run(
            [sys.executable, "-m", "bnexport", "export", str(saved), "-o", str(cli_out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        row["cli_exit"] = proc.returncode
        row["cli_tail"] = (proc.stdout + proc.stderr)[-1500:]
        row["cli_written"] = cli_out.is_file()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MobileNetV2,ResNet50")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument(
        "--keras-file", default="", help="models (comma-separated) also exported from .keras"
    )
    args = parser.parse_args(argv)
    import keras

    result: dict = {"backend": keras.config.backend(), "keras": keras.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            via_file = name in args.keras_file.split(",")
            result["rows"].append(check_model(name, args.size, Path(tmp), via_file))
    result["heavy_loaded"] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
