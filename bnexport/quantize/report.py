"""``QuantizeReport``: what an INT8 quantization did and how close the result is."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from bnexport.export.report import FoldRecord
from bnexport.quantize.compare import OutputMetrics


@dataclasses.dataclass
class SearchStep:
    """One try of the auto-exclude search: ``k`` most sensitive nodes kept in float32."""

    k: int
    excluded: list[str]
    top1_agreement: float | None
    nmse: float


@dataclasses.dataclass
class QuantizeReport:
    """Everything a :func:`bnexport.quantize` call did.

    Attributes:
        source: the float32 model quantized (a path, or ``"<in-memory>"``).
        path: the INT8 file written (``None`` when nothing was written).
        method: calibration method (``minmax``, ``entropy``, ``percentile``).
        per_channel: per-output-channel weight scales.
        op_types: op types that got Q/DQ on their inputs.
        target: ``"tensorrt"`` (symmetric int8 activations) or ``"cpu"`` (uint8).
        fold_records: what bnexport's fold pass did to each BN before quantization
            (for the export path: the exporter's fold).
        bn_unfolded: BN nodes left unfolded (quantized around, in float32); empty
            unless ``allow_unfolded_bn=True``.
        calibration_samples: samples the ranges were calibrated on.
        calibration_batches: batches they were fed in.
        eval_samples: samples the INT8 graph was compared to the float32 graph on.
        eval_data: ``"calibration"`` or ``"validation"`` (what ``eval_samples`` are).
        quantized_nodes: ``{node: op type}`` of nodes with int8 inputs and weights.
        float_nodes: ``{node: op type}`` of quantizable nodes left in float32.
        excluded: nodes kept in float32 by request (``exclude``) and by the search.
        auto_excluded: the part of ``excluded`` chosen by the auto-exclude search.
        sensitivity: ``{node: output NMSE when only that node is int8}`` (search only),
            most sensitive first.
        search: the auto-exclude tries, in order.
        target_agreement: the search's target (``None``: no search).
        outputs: per-output error of the INT8 graph's Q/DQ semantics (evaluated as float,
            host-independent) against the float32 graph: the quantization error, which
            decides (:mod:`bnexport.quantize.verdict`).
        kernel_outputs: the same for the int8 kernels of this host (``kernel_source``).
        kernel_source: what computed ``kernel_outputs`` (onnxruntime here, or the
            emulation of non-VNNI kernels under ``BNEXPORT_CPU_INT8=novnni``).
        kernel_emulated: ``kernel_outputs`` are predicted, not measured.
        cpu: this CPU's int8 features
            (:class:`~bnexport.runtime.cpu_features.Int8Features`).
        reduce_range: 7-bit weights (``target="cpu"`` without ``full_range_weights``).
        verdict_target: the top-1 agreement the graph had to reach (``None``: none).
        verdict_target_origin: ``explicit``, ``default`` or why there was none.
        below_target: the graph missed ``verdict_target`` (kept by ``keep_below_target``).
        weights: ``{weight tensor: {dtype, axis, channels, zero_points_zero}}``.
        tensorrt_ready: symmetric int8 (zero point 0) everywhere, int8 weights, no int32
            bias — what TensorRT's explicit quantization needs.
        tensorrt_problems: why not, when it is not.
        node_counts: ``{"float32": n, "int8": n}`` nodes in each graph.
        op_counts: ``{op type: count}`` of the INT8 graph.
        sizes: ``{"float32": bytes, "int8": bytes}`` serialized model sizes.
        timings: seconds per phase (``fold`` with data validation, ``prepare``,
            ``quantize`` with calibration and measurement, ``search``, ``write``, ``total``).
        warnings: what the user must know (an unfolded BN and its measured cost).
        notes: remarks.
    """

    source: str
    path: str | None
    method: str
    per_channel: bool
    op_types: list[str]
    target: str = "tensorrt"
    fold_records: list[FoldRecord] = dataclasses.field(default_factory=list)
    bn_unfolded: list[str] = dataclasses.field(default_factory=list)
    calibration_samples: int = 0
    calibration_batches: int = 0
    eval_samples: int = 0
    eval_data: str = "calibration"
    quantized_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    float_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    excluded: list[str] = dataclasses.field(default_factory=list)
    auto_excluded: list[str] = dataclasses.field(default_factory=list)
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)
    search: list[SearchStep] = dataclasses.field(default_factory=list)
    target_agreement: float | None = None
    outputs: list[OutputMetrics] = dataclasses.field(default_factory=list)
    kernel_outputs: list[OutputMetrics] = dataclasses.field(default_factory=list)
    kernel_source: str = ""
    kernel_emulated: bool = False
    cpu: dict[str, Any] = dataclasses.field(default_factory=dict)
    reduce_range: bool = False
    verdict_target: float | None = None
    verdict_target_origin: str = ""
    below_target: bool = False
    weights: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    tensorrt_ready: bool = False
    tensorrt_problems: list[str] = dataclasses.field(default_factory=list)
    node_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def bn_folded(self) -> int:
        """BNs folded into a neighbouring linear op before quantization."""
        return sum(r.action in ("folded_forward", "folded_backward") for r in self.fold_records)

    @property
    def top1_agreement(self) -> float | None:
        """Top-1 agreement of the first class-score output with the float32 graph."""
        return next((m.top1_agreement for m in self.outputs if m.top1_agreement is not None), None)

    @property
    def kernel_top1_agreement(self) -> float | None:
        """Top-1 agreement of the first class-score output on this host's int8 kernels."""
        return next(
            (m.top1_agreement for m in self.kernel_outputs if m.top1_agreement is not None), None
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["fold_records"] = [r.to_dict() for r in self.fold_records]
        data["outputs"] = [m.to_dict() for m in self.outputs]
        data["kernel_outputs"] = [m.to_dict() for m in self.kernel_outputs]
        data["bn_folded"] = self.bn_folded
        data["top1_agreement"] = self.top1_agreement
        data["kernel_top1_agreement"] = self.kernel_top1_agreement
        return data

    def verdict_line(self) -> str:
        """The headline: did the graph reach its target, by the quantization error."""
        agreement = self.top1_agreement
        measured = (
            f"top-1 agreement {agreement:.2%}" if agreement is not None else "no class output"
        )
        if self.verdict_target is None:
            return f"verdict: {measured} (no target: {self.verdict_target_origin or 'none'})"
        if self.below_target:
            return (
                f"verdict: BELOW TARGET {self.verdict_target:.2%}: {measured} "
                "(kept by keep_below_target; do not deploy without checking)"
            )
        return f"verdict: ok, {measured} >= target {self.verdict_target:.2%}"

    def fold_summary(self) -> str:
        """What the fold pass before quantization did, in one phrase."""
        if not self.bn_folded and not self.bn_unfolded:
            return "no BN left to fold before quantization (graph already folded)"
        return f"{self.bn_folded} BN folded before quantization" + (
            f", {len(self.bn_unfolded)} left unfolded" if self.bn_unfolded else ""
        )

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string (non-finite numbers as ``null``)."""
        return json.dumps(_finite(self.to_dict()), indent=indent)

    def summary_lines(self) -> list[str]:
        """A few lines: folding, quantized nodes, agreement, TensorRT check."""
        agreement = self.top1_agreement
        lines = [
            self.verdict_line(),
            self.fold_summary(),
            f"{len(self.quantized_nodes)} node(s) int8 ({_counts(self.quantized_nodes)}), "
            f"{len(self.float_nodes)} left float32"
            + (f" ({len(self.excluded)} excluded)" if self.excluded else ""),
            f"calibration: {self.method}, {self.calibration_samples} samples; "
            f"weights {'per-channel' if self.per_channel else 'per-tensor'} symmetric "
            f"{'7-bit' if self.reduce_range else 'int8'}; "
            + (
                "activations symmetric int8"
                if self.target == "tensorrt"
                else "activations asymmetric uint8 (target cpu)"
            ),
        ]
        if agreement is not None:
            lines.append(
                f"quantization error (Q/DQ graph as float): top-1 agreement with float32 "
                f"{agreement:.2%} on {self.eval_samples} {self.eval_data} samples"
            )
        kernel = self.kernel_top1_agreement
        if self.kernel_source:
            lines.append(
                f"kernel error ({self.kernel_source}"
                + (", predicted" if self.kernel_emulated else "")
                + "): "
                + (
                    f"top-1 agreement {kernel:.2%}"
                    if kernel is not None
                    else ", ".join(f"SQNR {m.sqnr_db:.1f} dB" for m in self.kernel_outputs)
                )
            )
        if self.cpu:
            lines.append(f"cpu: {self.cpu.get('machine')} int8 flags {self.cpu.get('flags')}")
        for m in self.outputs:
            lines.append(
                f"output {m.name!r}: max abs error {m.max_abs_error:.3g} "
                f"(max |ref| {m.max_abs_ref:.3g}), SQNR {m.sqnr_db:.1f} dB"
            )
        trt = "; ".join(self.tensorrt_problems[:3])
        if self.tensorrt_ready:
            trt = "not ready (below target)" if self.below_target else "ready"
        lines.append("TensorRT explicit quantization: " + trt)
        if self.path:
            sizes = self.sizes
            lines.append(
                f"wrote {self.path} ({sizes.get('int8', 0) / 1e6:.2f} MB, float32 "
                f"{sizes.get('float32', 0) / 1e6:.2f} MB)"
            )
        return lines + [f"warning: {w}" for w in self.warnings] + self.notes

    def table(self) -> Any:
        """A ``rich.table.Table`` of the outputs, captioned with :meth:`summary_lines`."""
        from rich.table import Table

        table = Table(
            title=f"bnexport quantize: {self.source}",
            caption="\n".join(self.summary_lines()),
            caption_justify="left",
        )
        # numbers never wrap (two-line headers keep the table within 80 columns);
        # only the output name folds
        table.add_column("output", overflow="fold")
        for column in (
            "top-1\nagreement",
            "max abs\nerror",
            "max\n|ref|",
            "SQNR\ndB",
            "kernels\ntop-1",
            "kernels\nSQNR dB",
        ):
            table.add_column(column, no_wrap=True, justify="right")
        kernels = {m.name: m for m in self.kernel_outputs}
        for m in self.outputs:
            k = kernels.get(m.name)
            table.add_row(
                m.name,
                _pct(m.top1_agreement),
                f"{m.max_abs_error:.3g}",
                f"{m.max_abs_ref:.3g}",
                f"{m.sqnr_db:.1f}",
                _pct(k.top1_agreement) if k else "-",
                f"{k.sqnr_db:.1f}" if k else "-",
            )
        return table

    def __str__(self) -> str:
        return "\n".join([f"bnexport quantize: {self.source}", *self.summary_lines()])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _counts(nodes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for op in nodes.values():
        counts[op] = counts.get(op, 0) + 1
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "none"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
