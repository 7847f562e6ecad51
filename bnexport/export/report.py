"""What became of each batch normalization during export or folding."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

Action = Literal["folded_forward", "folded_backward", "fused", "kept"]


@dataclasses.dataclass
class FoldRecord:
    """The fate of one BN (a Keras layer, or an ONNX BatchNormalization / Mul-Add chain).

    Attributes:
        name: the Keras layer name, or the ONNX node name when no layer is known.
        action: ``folded_forward`` (into the producing linear op), ``folded_backward``
            (into the consuming linear op), ``fused`` (became one node), or ``kept``.
        target: the ONNX node it was folded into or that replaced it; ``None`` if kept.
        reason: why this action (for ``fused``/``kept``: why folding was refused).
    """

    name: str
    action: Action
    target: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class VerifyResult:
    """Outcome of comparing the exported graph with the source model.

    The check passes when every element of every output satisfies
    ``|onnx − ref| <= atol + rtol·|ref|`` (:mod:`bnexport.tolerance`, the policy the
    parity checker applies too).

    Attributes:
        passed: every output within its tolerance.
        max_abs_error: the largest absolute error over all outputs.
        tolerance: ``atol + rtol·|ref|`` at the element with the worst error/tolerance
            ratio (over all outputs).
        worst_output: name of that output.
        rtol: relative part of the tolerance (times ``|ref|`` of each element).
        atol: absolute part of the tolerance.
        batch: batch size of the generated inputs.
        per_output: ``{output: {"max_abs_error", "max_abs_ref", "tolerance",
            "worst_abs_error", "violations"}}``.
        runtime: what ran the ONNX graph (``"onnxruntime"`` or a plugin CPU path).
    """

    passed: bool
    max_abs_error: float
    tolerance: float
    worst_output: str
    rtol: float
    atol: float
    batch: int
    per_output: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ExportReport:
    """Everything an export did: where each BN went, the graph written, the verification.

    Attributes:
        path: the ONNX file written.
        opset: default-domain opset of the graph.
        dtype: ``"float32"`` or ``"float16"`` (weights and compute).
        io_dtype: dtype of the graph's float inputs and outputs.
        fused_norm: ``"onnx"`` or ``"plugin"``.
        dynamic_batch: whether the batch dimension is symbolic.
        source: what was exported (``"keras"``, ``"tf_keras"``, ``"saved_model"``).
        inputs: ``{name: shape}`` of the graph inputs (``None`` for a dynamic dimension).
        outputs: ``{name: shape}`` of the graph outputs.
        records: one :class:`FoldRecord` per batch normalization found.
        layer_outputs: ``{keras layer: onnx tensor}`` carrying that layer's output
            (also written to the model's metadata as ``bnexport.layer_outputs``).
        layer_output_perms: ``{keras layer: perm}`` for mapped tensors stored in
            another layout: ``keras_output = onnx_tensor.transpose(perm)``.
        float32_nodes: nodes kept in float32 in a float16 export (folded weights overflow).
        node_count: nodes in the final graph.
        op_counts: ``{op_type: count}`` of the final graph.
        verify: the verification result, or ``None`` when ``verify=False``.
        timings: seconds per stage, in pipeline order: ``load`` (model and BN layers),
            ``emit`` (the Keras-native engine) or ``trace`` (the ``tf.function``),
            ``freeze`` (variables to constants, grappler), ``convert`` (tf2onnx and its
            optimizers); ``fold``, ``layer_map``,
            ``float16``/``int8`` when asked for, ``check``, ``verify``, ``write``; and
            ``total``. The table's caption prints them.
        notes: remarks (e.g. that the model has no batch normalization).
        int8: the :class:`~bnexport.quantize.report.QuantizeReport` of an ``int8=`` export
            (the file at ``path`` is then the INT8 graph), else ``None``.
        engine: the exporter that ran: ``"keras"`` (the Keras-native emitter) or
            ``"tf2onnx"`` (trace + tf2onnx).
        fallback_reason: when ``engine="auto"`` fell back to tf2onnx, the layer or op the
            emitter could not express and why; ``""`` otherwise.
    """

    path: str
    opset: int
    dtype: str
    io_dtype: str
    fused_norm: str
    dynamic_batch: bool
    source: str = "keras"
    inputs: dict[str, list[int | None]] = dataclasses.field(default_factory=dict)
    outputs: dict[str, list[int | None]] = dataclasses.field(default_factory=dict)
    records: list[FoldRecord] = dataclasses.field(default_factory=list)
    layer_outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    layer_output_perms: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    float32_nodes: list[str] = dataclasses.field(default_factory=list)
    node_count: int = 0
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    verify: VerifyResult | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    int8: Any = None
    engine: str = "tf2onnx"
    fallback_reason: str = ""

    @property
    def summary(self) -> dict[str, int]:
        """Count of BNs per action, plus ``total``."""
        counts = {action: 0 for action in typing.get_args(Action)}
        for record in self.records:
            counts[record.action] = counts.get(record.action, 0) + 1
        counts["total"] = len(self.records)
        return counts

    @property
    def export_time_s(self) -> float:
        """Wall time of the whole export, in seconds."""
        return float(self.timings.get("total", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (records and verification as nested dicts)."""
        data = dataclasses.asdict(self)
        data["records"] = [record.to_dict() for record in self.records]
        data["verify"] = None if self.verify is None else self.verify.to_dict()
        data["summary"] = self.summary
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def table(self) -> Any:
        """The ``-v`` view: one row per BN, then the summary and verification as prose.

        The action column never wraps; names, targets and reasons fold to the width; the
        reason column is left out when no BN has one. The summary lines follow the table
        left-aligned, so they wrap at the console width rather than the table's.
        """
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"bnexport: {self.path}", title_justify="left", show_lines=False)
        reasons = any(record.reason for record in self.records)  # else no empty column
        table.add_column("batch norm", overflow="fold", ratio=3)
        table.add_column("action", no_wrap=True)
        table.add_column("target", overflow="fold", ratio=3)
        if reasons:
            table.add_column("reason", overflow="fold", ratio=4)
        for record in self.records:
            row = [record.name, record.action, record.target or "-"]
            table.add_row(*row, *([record.reason] if reasons else []))
        return Group(table, Text(self._caption()))

    @property
    def path_description(self) -> str:
        """Which path ran: what was loaded, the converter, and the folding pass."""
        source = {
            "keras": "Keras 3 model",
            "tf_keras": "tf.keras model",
            "saved_model": "SavedModel signature",
        }.get(self.source, self.source)
        engine = getattr(self, "engine", None) or "tf2onnx"
        steps = [source, {"keras": "Keras-native emitter"}.get(engine, engine), "fold"]
        if self.dtype == "float16":
            steps.append("float16")
        if self.int8 is not None:
            steps.append("int8 QDQ")
        return " -> ".join(steps)

    def summary_view(self) -> Any:
        """The default console view: counts by outcome, the BNs that did not fold and why.

        A ``rich`` renderable of a few lines whatever the model's size (the per-BN
        :meth:`table` is for ``-v``); each line wraps as prose at the console width.
        """
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = [
            Text(f"bnexport: {self.path} ({self.path_description})"),
            Text(self._caption(stages=False)),
        ]
        refused = [r for r in self.records if r.action in ("fused", "kept")]
        if refused:
            table = Table(title=f"{len(refused)} batch norm(s) not folded", title_justify="left")
            table.add_column("batch norm", overflow="fold", ratio=1)
            table.add_column("became", no_wrap=True)
            table.add_column("why not folded", overflow="fold", ratio=2)
            for record in refused:
                became = "one node" if record.action == "fused" else "kept"
                table.add_row(record.name, became, record.reason or "-")
            parts.append(table)
        if self.records:
            parts.append(Text("-v lists every batch norm and the stage times", style="dim"))
        return Group(*parts)

    @property
    def engine_description(self) -> str:
        """``engine keras``, or ``engine tf2onnx`` with the fallback's reason when there was one."""
        if self.fallback_reason:
            return f"engine {self.engine} (fallback: {self.fallback_reason})"
        return f"engine {self.engine}"

    def _caption(self, *, stages: bool = True) -> str:
        s = self.summary
        parts = [
            f"{s['total']} BN: {s['folded_forward']} folded forward, "
            f"{s['folded_backward']} folded backward, {s['fused']} fused, {s['kept']} kept",
            f"opset {self.opset}, {self.dtype} (io {self.io_dtype}), {self.node_count} nodes, "
            f"{self.export_time_s:.2f} s",
        ]
        parts.append(self.engine_description)
        times = [f"{k} {v:.2f}" for k, v in self.timings.items() if k != "total"]
        if stages and times:
            parts.append("stage times (s): " + ", ".join(times))
        if self.verify is not None:
            v = self.verify
            verdict = "passed" if v.passed else "FAILED"
            parts.append(
                f"verify {verdict}: max abs error {v.max_abs_error:.3g} "
                f"(tolerance {v.tolerance:.3g}, worst output {v.worst_output!r})"
            )
        else:
            parts.append("not verified")
        parts.extend(self.notes)
        return "\n".join(parts)

    def __str__(self) -> str:
        lines = [f"bnexport: {self.path}"]
        for record in self.records:
            target = f" -> {record.target}" if record.target else ""
            reason = f" ({record.reason})" if record.reason else ""
            lines.append(f"  {record.name}: {record.action}{target}{reason}")
        lines.extend(self._caption().splitlines())
        return "\n".join(lines)
