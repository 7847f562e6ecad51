"""The quickstart's INT8 step: quantize ``digits.onnx`` for this machine and compare it.

The target is picked for the CPU it runs on (:func:`choose_target`): ``tensorrt``
(symmetric int8, 8-bit weights) where onnxruntime's int8 kernels accumulate in int32
(VNNI / AVX-VNNI / AMX / ARM dot product), ``cpu`` (uint8 activations, 7-bit weights)
where they may saturate; the step says which and why.

Calibration uses 256 training images (never the test split). Test accuracy is measured
on the whole test split for the float32 graph, for the INT8 graph as this host's int8
kernels run it (or, under ``BNEXPORT_CPU_INT8=novnni`` on a VNNI host, as the NumPy
emulation of non-VNNI kernels predicts it) and for its Q/DQ semantics evaluated as float
(the quantization error alone). Latency is the median of interleaved runs on onnxruntime
CPU (2 threads) at batch 1 and batch 8, so both graphs see the same load.
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
    """What the quickstart prints about the INT8 graph.

    Attributes:
        path: the INT8 file.
        report: the :class:`~bnexport.quantize.report.QuantizeReport`.
        accuracy: test accuracy of ``float32``, ``int8`` (this host's kernels, or their
            emulation) and ``int8 q/dq`` (the graph's semantics as float).
        latency_ms: ``{graph: {batch: ms}}`` on onnxruntime.
        agreement: top-1 agreement of ``int8`` (kernels) with float32 on the test split.
        target: the quantization target used, and ``target_reason`` why.
        kernel_source: what ran the ``int8`` row.
    """

    path: Path
    report: Any
    accuracy: dict[str, float]
    latency_ms: dict[str, dict[int, float]]
    agreement: float
    target: str = "tensorrt"
    target_reason: str = ""
    kernel_source: str = ""


def choose_target() -> tuple[str, str]:
    """``(target, reason)`` for this CPU (``bnexport.runtime.cpu_features``)."""
    from bnexport.runtime.cpu_features import cpu_int8_features

    features = cpu_int8_features()
    if features.may_saturate:
        return "cpu", (
            f"{features.describe()}; uint8 activations and 7-bit weights cannot saturate"
        )
    return "tensorrt", f"{features.describe()}; the TensorRT form runs exactly here"


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


def int8_step(
    onnx_path: Path, data: Any, out: Path, console: Any, runs: int = 50, target: str | None = None
) -> Int8Result:
    """Quantize ``onnx_path`` to ``out/digits.int8.onnx``, measure and print both graphs.

    Args:
        onnx_path: the float32 digits graph.
        data: the :class:`~bnexport.data.digits.DigitsSplit`.
        out: the output folder.
        console: a ``rich`` console to print to.
        runs: timed runs per graph and batch size.
        target: the quantization target; ``None``: :func:`choose_target`.
    """
    import onnx
    from rich.table import Table

    from bnexport.quantize.compare import make_session
    from bnexport.quantize.pipeline import quantize
    from bnexport.quantize.verdict import kernel_session

    reason = "requested"
    if target is None:
        target, reason = choose_target()
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(data.x_train))[:CALIBRATION_SAMPLES]
    int8_path = out / "digits.int8.onnx"
    report = quantize(
        onnx_path,
        int8_path,
        data.x_train[pick].astype(np.float32),
        validation=data.x_test,
        target=target,
    )
    int8_model = onnx.load(int8_path)
    kernels, kernel_source, _ = kernel_session(int8_model)
    sessions = {
        "float32": make_session(onnx_path, threads=2),
        "int8": make_session(int8_path, threads=2),
    }
    evaluated = {**sessions, "int8 q/dq": make_session(int8_model, optimize=False)}
    evaluated["int8"] = kernels  # onnxruntime here, or the non-VNNI emulation
    name = sessions["float32"].get_inputs()[0].name
    x = np.asarray(data.x_test, np.float32)
    predictions = {
        k: np.asarray(s.run(None, {name: x})[0]).argmax(-1) for k, s in evaluated.items()
    }
    accuracy = {k: float(np.mean(p == data.y_test)) for k, p in predictions.items()}
    agreement = float(np.mean(predictions["int8"] == predictions["float32"]))
    latency = _latency_ms(sessions, {1: {name: x[:1]}, 8: {name: x[:8]}}, runs)
    table = Table(
        title=f"INT8, target {target} ({report.method} calibration on {len(pick)} training images)"
    )
    for column in ("graph", "test accuracy", "batch 1 ms", "batch 8 ms", "size MB"):
        table.add_column(column)
    rows = (
        ("float32", "float32", onnx_path),
        ("int8", f"int8 ({kernel_source})", int8_path),
        ("int8 q/dq", "int8 Q/DQ as float (quantization error only)", None),
    )
    for key, label, path in rows:
        table.add_row(
            label,
            f"{accuracy[key]:.2%}",
            f"{latency[key][1]:.3f}" if key in latency else "-",
            f"{latency[key][8]:.3f}" if key in latency else "-",
            f"{Path(path).stat().st_size / 1e6:.3f}" if path else "-",
        )
    console.print(table)
    console.print(f"INT8 target {target}: {reason}", highlight=False)
    console.print(
        f"int8 top-1 agreement with float32 on the test split: {agreement:.2%} "
        f"(Q/DQ graph {report.top1_agreement:.2%}); {report.fold_summary()}; wrote {int8_path}",
        highlight=False,
    )
    for warning in report.warnings:
        console.print(f"warning: {warning}", highlight=False)
    return Int8Result(
        int8_path, report, accuracy, latency, agreement, target, reason, kernel_source
    )
