"""The quickstart's INT8 step: quantize ``digits.onnx`` and compare it with float32.

Calibration uses 256 training images (never the test split). Test accuracy is measured
on the whole test split for both graphs; latency is the median of interleaved runs on
onnxruntime CPU (2 threads) at batch 1 and batch 8, so both graphs see the same load.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

#: training images used for calibration
CALIBRATION_SAMPLES = 256


@dataclasses.dataclass
class Int8Result:
    """What the quickstart prints about the INT8 graph."""

    path: Path
    report: Any
    accuracy: dict[str, float]
    latency_ms: dict[str, dict[int, float]]
    agreement: float


def _latency_ms(sessions: dict[str, Any], feeds: dict[int, dict], runs: int) -> dict:
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in feeds} for k in sessions}
    for session in sessions.values():  # warm-up
        for feed in feeds.values():
            session.run(None, feed)
    for r in range(runs):
        order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))
        for name in order:
            for batch, feed in feeds.items():
                t = time.perf_counter()
                sessions[name].run(None, feed)
                times[name][batch].append((time.perf_counter() - t) * 1e3)
    return {k: {b: statistics.median(v) for b, v in d.items()} for k, d in times.items()}


def int8_step(onnx_path: Path, data: Any, out: Path, console: Any, runs: int = 50) -> Int8Result:
    """Quantize ``onnx_path`` to ``out/digits.int8.onnx``, measure and print both graphs."""
    from rich.table import Table

    from bnexport.quantize.compare import make_session
    from bnexport.quantize.pipeline import quantize

    rng = np.random.default_rng(0)
    pick = rng.permutation(len(data.x_train))[:CALIBRATION_SAMPLES]
    int8_path = out / "digits.int8.onnx"
    report = quantize(
        onnx_path, int8_path, data.x_train[pick].astype(np.float32), validation=data.x_test
    )
    sessions = {
        "float32": make_session(onnx_path, threads=2),
        "int8": make_session(int8_path, threads=2),
    }
    name = sessions["float32"].get_inputs()[0].name
    x = np.asarray(data.x_test, np.float32)
    predictions = {k: s.run(None, {name: x})[0].argmax(-1) for k, s in sessions.items()}
    accuracy = {k: float(np.mean(p == data.y_test)) for k, p in predictions.items()}
    agreement = float(np.mean(predictions["int8"] == predictions["float32"]))
    latency = _latency_ms(sessions, {1: {name: x[:1]}, 8: {name: x[:8]}}, runs)
    table = Table(title=f"INT8 ({report.method} calibration on {len(pick)} training images)")
    for column in ("graph", "test accuracy", "batch 1 ms", "batch 8 ms", "size MB"):
        table.add_column(column)
    for key, path in (("float32", onnx_path), ("int8", int8_path)):
        table.add_row(
            key,
            f"{accuracy[key]:.2%}",
            f"{latency[key][1]:.3f}",
            f"{latency[key][8]:.3f}",
            f"{Path(path).stat().st_size / 1e6:.3f}",
        )
    console.print(table)
    console.print(
        f"int8 top-1 agreement with float32 on the test split: {agreement:.2%}; "
        f"{report.fold_summary()}; wrote {int8_path}",
        highlight=False,
    )
    return Int8Result(int8_path, report, accuracy, latency, agreement)
