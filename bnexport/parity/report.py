"""Result objects of a parity run and their renderings (terminal table, JSON, HTML).

A :class:`ParityReport` is truthy when every requested backend produced every
output within tolerance, every compared layer too when per-layer results were
asked for (a wrong weight can hide behind a saturated softmax: the intermediate
tensor still shows it), and, when checked, every BN layer matched in training
mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from bnexport.parity.compare import Comparison, _jsonable


@dataclasses.dataclass
class LayerResult:
    """One Keras layer compared with its ONNX tensor.

    Attributes:
        layer: Keras layer name.
        tensor: ONNX tensor name.
        layout: how the ONNX value was aligned (``same``, ``channels_first->last``...).
        comparison: the comparison, or ``None`` when skipped.
        skipped: why it was not compared ("" when compared).
    """

    layer: str
    tensor: str
    layout: str = "same"
    comparison: Comparison | None = None
    skipped: str = ""

    @property
    def failed(self) -> bool:
        """Compared and out of tolerance."""
        return self.comparison is not None and not self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "layer": self.layer,
            "tensor": self.tensor,
            "layout": self.layout,
            "skipped": self.skipped,
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
        }


@dataclasses.dataclass
class BackendResult:
    """Everything compared for one backend.

    Attributes:
        backend: runner name (``onnxruntime``, ``tensorrt``).
        precision: precision the backend ran in.
        outputs: one comparison per model output.
        layers: per-layer results in graph order (empty without ``per_layer``).
        layer_map_source: ``metadata`` or ``heuristic`` (per-layer only).
        error: why the backend could not run ("" when it ran).
        seconds: inference wall time.
        quantized: the graph is INT8 (QDQ): outputs are judged by top-1 agreement /
            cosine, layers are reported and ranked but do not fail the run.
        layer_losses: INT8 per-layer only: :class:`bnexport.parity.quantized.LayerLoss`
            entries, the layer adding most error first.
        quantization_outputs: INT8 on onnxruntime only: the same comparisons for the
            graph's Q/DQ semantics evaluated as float (graph optimizations off): the
            quantization error alone, without this CPU's int8 kernels.
        int8_note: why the kernels lose more than the quantization ("" when they do not).
    """

    backend: str
    precision: str = "fp32"
    outputs: list[Comparison] = dataclasses.field(default_factory=list)
    layers: list[LayerResult] = dataclasses.field(default_factory=list)
    layer_map_source: str | None = None
    error: str = ""
    seconds: float | None = None
    quantized: bool = False
    layer_losses: list[Any] = dataclasses.field(default_factory=list)
    quantization_outputs: list[Comparison] = dataclasses.field(default_factory=list)
    int8_note: str = ""

    @property
    def quantization_top1(self) -> float | None:
        """Lowest top-1 agreement of the Q/DQ graph as float (``None``: not measured)."""
        values = [c.top1 for c in self.quantization_outputs if c.top1 is not None]
        return min(values) if values else None

    @property
    def passed(self) -> bool:
        """Ran, every output passed, and (float graphs) every compared layer too."""
        outputs_ok = not self.error and bool(self.outputs) and all(self.outputs)
        return outputs_ok and (self.quantized or not any(r.failed for r in self.layers))

    @property
    def top1(self) -> float | None:
        """Lowest top-1 agreement over the class-score outputs (``None``: none)."""
        values = [c.top1 for c in self.outputs if c.top1 is not None]
        return min(values) if values else None

    @property
    def exclude_candidates(self) -> list[str]:
        """INT8: ONNX nodes of the 3 layers adding most error (``quantize --exclude``)."""
        from bnexport.parity.quantized import exclude_candidates

        return exclude_candidates(self.layer_losses)

    @property
    def first_failing_layer(self) -> LayerResult | None:
        """The first layer (graph order) out of tolerance, or ``None``."""
        return next((r for r in self.layers if r.failed), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        first = self.first_failing_layer
        return {
            "backend": self.backend,
            "precision": self.precision,
            "passed": self.passed,
            "error": self.error,
            "seconds": self.seconds,
            "outputs": [c.to_dict() for c in self.outputs],
            "layer_map_source": self.layer_map_source,
            "first_failing_layer": None if first is None else first.layer,
            "layers": [r.to_dict() for r in self.layers],
            "quantized": self.quantized,
            "top1": self.top1,
            "layer_losses": [loss.to_dict() for loss in self.layer_losses],
            "exclude_candidates": self.exclude_candidates,
            "quantization_outputs": [c.to_dict() for c in self.quantization_outputs],
            "quantization_top1": self.quantization_top1,
            "int8_note": self.int8_note,
        }


@dataclasses.dataclass
class TrainingModeResult:
    """One BN layer in training mode: Keras batch statistics vs FusedNorm ``batch_stats``.

    Attributes:
        layer: Keras layer name.
        virtual_batch_size: ghost-batch size used (0 = whole batch).
        comparisons: ``{"reference": ..., "onnxruntime": ...}`` against Keras.
        skipped: why the layer was not checked ("" when checked).
        note: diagnosis of a failure, e.g. a ghost-batch grouping convention mismatch.
    """

    layer: str
    virtual_batch_size: int = 0
    comparisons: dict[str, Comparison] = dataclasses.field(default_factory=dict)
    skipped: str = ""
    note: str = ""

    @property
    def passed(self) -> bool:
        """Skipped layers do not fail; checked ones pass on every path."""
        return all(self.comparisons.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "layer": self.layer,
            "virtual_batch_size": self.virtual_batch_size,
            "skipped": self.skipped,
            "note": self.note,
            "passed": self.passed,
            "comparisons": {k: v.to_dict() for k, v in self.comparisons.items()},
        }


@dataclasses.dataclass
class ParityReport:
    """The result of :func:`bnexport.parity.check_parity`; truthy when parity holds.

    Attributes:
        model: description of the Keras model (path or name).
        onnx: path of the exported model (or ``"<ModelProto>"``).
        samples: number of samples compared.
        inputs: ``{input name: shape}`` of the feed.
        backends: one result per backend.
        training: training-mode results (``None`` when not requested).
        seconds: wall time of the whole run.
    """

    model: str
    onnx: str
    samples: int
    inputs: dict[str, list[int]]
    backends: list[BackendResult]
    training: list[TrainingModeResult] | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Every backend passed, and training mode (if checked) too."""
        ok = bool(self.backends) and all(b.passed for b in self.backends)
        if self.training is not None:
            ok = ok and all(t.passed for t in self.training)
        return ok

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats as strings)."""
        return _jsonable(
            {
                "passed": self.passed,
                "model": self.model,
                "onnx": self.onnx,
                "samples": self.samples,
                "inputs": self.inputs,
                "seconds": self.seconds,
                "backends": [b.to_dict() for b in self.backends],
                "training_mode": None
                if self.training is None
                else [t.to_dict() for t in self.training],
            }
        )

    def to_json(self) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON report atomically."""
        from bnexport.atomic_write import write_text_atomic

        write_text_atomic(path, self.to_json(), make_parents=True)

    def write_html(self, path: str | os.PathLike[str]) -> None:
        """Write the self-contained HTML report (per-layer error plot embedded) atomically."""
        from bnexport.parity.report_html import write_html

        write_html(self, path)

    def table(self) -> Any:
        """A rich renderable: one table of outputs per backend, then per-layer summaries."""
        from bnexport.parity.report_table import render

        return render(self)

    def print(self, console: Any = None) -> None:
        """Print :meth:`table` to ``console`` (a ``rich.console.Console``; stdout by default)."""
        from rich.console import Console

        (console or Console()).print(self.table())
