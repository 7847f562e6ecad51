"""Measure an INT8 graph against its float32 source on the same inputs.

For each graph output ``o`` (int8 ``q``, float32 reference ``r``, over all samples):

- ``max_abs_error = max|q − r|`` and ``max_abs_ref = max|r|``;
- ``nmse = Σ(q − r)² / Σr²`` (normalized mean squared error; ``-10·log10(nmse)`` is the
  signal-to-quantization-noise ratio in dB);
- ``top1_agreement``: for outputs of rank ≥ 2 with a last dimension ≥ 2 (class scores),
  the fraction of samples with ``argmax q == argmax r`` over the last axis; ``None`` else.

The *primary* agreement of a model is that of its first class-score output (top-1
agreement is what a classifier's user sees; output errors of logits are not comparable
across models). Sessions run on onnxruntime's CPU provider: with graph optimizations off
(``make_session(..., optimize=False)``) the INT8 graph's Q/DQ nodes run as written, in
float (the quantization error, the quantizer's verdict); with full optimization it runs
on the host's int8 kernels (the kernel error; see :mod:`bnexport.quantize.verdict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class OutputMetrics:
    """Error of one output of the INT8 graph (see the module docstring)."""

    name: str
    max_abs_error: float
    max_abs_ref: float
    nmse: float
    top1_agreement: float | None

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio, ``-10·log10(nmse)`` dB (inf when exact)."""
        return float("inf") if self.nmse <= 0 else float(-10.0 * np.log10(self.nmse))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["sqnr_db"] = self.sqnr_db
        return data


def make_session(model: Any, *, optimize: bool = True, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on ``model`` (a ModelProto, bytes or a path) that measures.

    :func:`bnexport.runtime.ort_session.make_session` (the project's one session maker)
    with two choices of the quantizer: the host's int8 kernels as they are (no x86
    precision mode, ``exact_int8=False``: their error is what is measured) and
    onnxruntime's warnings off (``log_severity_level=3``).
    """
    import onnxruntime as ort

    from bnexport.runtime.ort_session import make_session as runtime_session

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return runtime_session(
        model, optimize=optimize, threads=threads, session_options=options, exact_int8=False
    )


def run_batches(
    session: Any, batches: Sequence[dict[str, np.ndarray]], outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run ``session`` on every batch; return each output concatenated along axis 0."""
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        for name, value in zip(names, session.run(names, batch), strict=True):
            parts[name].append(np.asarray(value))
    return {
        name: np.concatenate(values, axis=0) if values[0].ndim else values[0]
        for name, values in parts.items()
    }


def is_class_scores(array: np.ndarray) -> bool:
    """Rank ≥ 2 with a last dimension ≥ 2: argmax over the last axis means something."""
    return array.ndim >= 2 and array.shape[-1] >= 2


def output_metrics(name: str, got: np.ndarray, ref: np.ndarray) -> OutputMetrics:
    """:class:`OutputMetrics` of ``got`` (int8 graph) against ``ref`` (float32 graph)."""
    got64, ref64 = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    diff = got64 - ref64
    energy = float(np.sum(ref64 * ref64))
    nmse = float(np.sum(diff * diff)) / energy if energy > 0 else float(np.sum(diff * diff))
    agreement = None
    if is_class_scores(ref64):
        agreement = float(np.mean(np.argmax(got64, axis=-1) == np.argmax(ref64, axis=-1)))
    finite = np.isfinite(diff)
    max_err = float(np.max(np.abs(diff))) if diff.size and finite.all() else float("inf")
    return OutputMetrics(
        name=name,
        max_abs_error=max_err if diff.size else 0.0,
        max_abs_ref=float(np.max(np.abs(ref64))) if ref64.size else 0.0,
        nmse=nmse if finite.all() else float("inf"),
        top1_agreement=agreement,
    )


def compare_outputs(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> list[OutputMetrics]:
    """:func:`output_metrics` for every output of ``ref``."""
    return [output_metrics(name, got[name], ref[name]) for name in ref]


def primary_agreement(metrics: Sequence[OutputMetrics]) -> float | None:
    """Top-1 agreement of the first class-score output (``None`` when there is none)."""
    return next((m.top1_agreement for m in metrics if m.top1_agreement is not None), None)


def mean_nmse(metrics: Sequence[OutputMetrics]) -> float:
    """Mean NMSE over the outputs (the sensitivity score)."""
    return float(np.mean([m.nmse for m in metrics])) if metrics else 0.0
