"""Runtime benchmark: overhead of ``bnexport.Session.run`` and the cost of a per-layer parity run.

1. ResNet50 (``keras.applications``, ``weights=None``) exported with ``bnexport.export``;
   ``Session.run`` vs a bare ``onnxruntime.InferenceSession.run`` on the same file with the
   same session options (CPU provider, ``--threads`` intra-op threads, sequential), batch 1
   and 32. The two are timed interleaved (alternating order each round) so drift of a shared
   machine hits both; the table shows the median over ``--runs`` rounds and the overhead
   ``median(Session) / median(bare) - 1`` (target <= 3 %), and the same from the minima
   (less sensitive to other processes on a shared machine).
2. The absolute per-call overhead on a tiny graph (x @ W), where inference costs ~nothing.
3. ``check_parity(..., per_layer=True)`` on ResNet50 (``--parity-samples`` samples), wall time,
   next to the same run without per-layer.

Usage: ``python benchmarks/runtime_bench.py [--runs 20] [--threads 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _session_options(threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def export_resnet50(workdir: Path, threads: int) -> tuple[Any, Path]:
    import keras
    import tensorflow as tf

    import bnexport

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None)
    path = workdir / "resnet50.onnx"
    if not path.exists():
        bnexport.export(model, path)
    return model, path


def time_pair(bare: Any, sess: Any, x: np.ndarray, runs: int, warmup: int = 2) -> dict[str, Any]:
    """Interleaved timings of the bare InferenceSession and bnexport.Session on ``x``."""
    name = bare.get_inputs()[0].name
    for _ in range(warmup):
        bare.run(None, {name: x})
        sess.run({name: x})
    t_bare: list[float] = []
    t_sess: list[float] = []
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            if which == 0:
                bare.run(None, {name: x})
                t_bare.append(time.perf_counter() - start)
            else:
                sess.run({name: x})
                t_sess.append(time.perf_counter() - start)
    mb, ms = statistics.median(t_bare), statistics.median(t_sess)
    return {
        "batch": int(x.shape[0]),
        "runs": runs,
        "bare_ms": mb * 1e3,
        "session_ms": ms * 1e3,
        "overhead_pct": (ms / mb - 1.0) * 100.0,
        "bare_min_ms": min(t_bare) * 1e3,
        "session_min_ms": min(t_sess) * 1e3,
        "overhead_min_pct": (min(t_sess) / min(t_bare) - 1.0) * 100.0,
    }


def bench_overhead(path: Path, threads: int, runs: int, batches: list[int]) -> list[dict]:
    import onnxruntime as ort

    import bnexport

    bare = ort.InferenceSession(
        str(path), sess_options=_session_options(threads), providers=["CPUExecutionProvider"]
    )
    sess = bnexport.Session(path, session_options=_session_options(threads))
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
        n = runs if batch <= 8 else max(5, runs // 3)
        rows.append({"model": "resnet50", **time_pair(bare, sess, x, n)})
    return rows


def bench_tiny(threads: int, runs: int = 2000) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import bnexport

    w = np.ones((16, 4), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    onnx.checker.check_model(model)
    bare = ort.InferenceSession(
        data, sess_options=_session_options(threads), providers=["CPUExecutionProvider"]
    )
    sess = bnexport.Session(model, session_options=_session_options(threads))
    row = time_pair(bare, sess, np.ones((1, 16), np.float32), runs, warmup=50)
    row["model"] = "tiny x@W"
    row["overhead_us"] = (row["session_ms"] - row["bare_ms"]) * 1e3
    return row


def bench_parity(model: Any, path: Path, samples: int) -> list[dict[str, Any]]:
    from bnexport.parity.check import check_parity

    rows = []
    for per_layer in (False, True):
        start = time.perf_counter()
        report = check_parity(model, path, samples=samples, per_layer=per_layer)
        seconds = time.perf_counter() - start
        layers = [r for r in report.backends[0].layers if r.comparison is not None]
        rows.append(
            {
                "what": "parity --per-layer" if per_layer else "parity (outputs only)",
                "samples": samples,
                "layers_compared": len(layers),
                "passed": report.passed,
                "seconds": seconds,
            }
        )
    return rows


def print_tables(results: dict[str, Any]) -> None:
    print(
        f"\nSession.run overhead vs bare InferenceSession.run (CPU, {results['threads']} threads)"
    )
    print(
        f"{'model':<10} {'batch':>5} {'runs':>5} {'bare ms':>10} {'Session ms':>11} "
        f"{'overhead':>9} {'(min-based)':>12}"
    )
    for r in results["overhead"]:
        print(
            f"{r['model']:<10} {r['batch']:>5} {r['runs']:>5} {r['bare_ms']:>10.2f} "
            f"{r['session_ms']:>11.2f} {r['overhead_pct']:>8.2f}% {r['overhead_min_pct']:>11.2f}%"
        )
    t = results["tiny"]
    print(
        f"{t['model']:<10} {t['batch']:>5} {t['runs']:>5} {t['bare_ms'] * 1e3:>8.1f}us "
        f"{t['session_ms'] * 1e3:>9.1f}us {t['overhead_us']:>7.1f}us  (absolute per-call cost)"
    )
    print("\nParity run on ResNet50 (Keras vs onnxruntime CPU)")
    print(f"{'what':<24} {'samples':>7} {'layers':>7} {'passed':>7} {'seconds':>8}")
    for r in results["parity"]:
        print(
            f"{r['what']:<24} {r['samples']:>7} {r['layers_compared']:>7} "
            f"{str(r['passed']):>7} {r['seconds']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="timed rounds at batch 1")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--parity-samples", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where the exported model is kept")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "bnexport-runtime-bench")
    workdir.mkdir(parents=True, exist_ok=True)
    model, path = export_resnet50(workdir, args.threads)
    results = {
        "threads": args.threads,
        "python": sys.version.split()[0],
        "overhead": bench_overhead(
            path, args.threads, args.runs, [int(b) for b in args.batches.split(",")]
        ),
        "tiny": bench_tiny(args.threads),
        "parity": bench_parity(model, path, args.parity_samples),
    }
    print_tables(results)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
