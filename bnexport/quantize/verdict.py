"""Two errors of an INT8 graph, and which one decides.

- The **quantization error**: the graph's own Q/DQ semantics, evaluated as float
  (onnxruntime with graph optimizations off runs ``QuantizeLinear``/``DequantizeLinear``
  and float ops exactly as the graph states them, which is what TensorRT computes). It
  does not depend on the host, so it is the verdict: the ``target_agreement`` check, the
  auto-exclude search, the exit code.
- The **kernel error**: what onnxruntime's int8 kernels compute on this CPU (graph
  optimizations on), measured; or, where ``BNEXPORT_CPU_INT8=novnni`` asks for a CPU
  this host is not, predicted by :mod:`bnexport.quantize.kernel_emulation`. It is reported
  beside the verdict, with one warning naming the cause when the two differ. It never
  steers the exclusion search (excluding nodes to hide kernel saturation would hide a
  host problem in the graph). For ``target="cpu"`` (a graph meant for CPU serving) the
  verdict must hold on the kernels too.

Default target (``target_agreement="auto"``): top-1 agreement :data:`DEFAULT_TARGET`
(0.99, the parity checker's INT8 bar) for a graph whose first output is class scores
measured on at least :data:`MIN_TARGET_ROWS` rows (below that, one disagreement moves the
agreement by more than a point); no target otherwise (tiny graphs, regression outputs),
as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from bnexport.errors import QuantizeError
from bnexport.quantize import compare
from bnexport.quantize.compare import OutputMetrics
from bnexport.tolerance import INT8_MIN_TOP1

#: default top-1 agreement of a classifier's INT8 graph with float32
DEFAULT_TARGET = INT8_MIN_TOP1
#: evaluation rows below which the default target does not apply
MIN_TARGET_ROWS = 100
#: a kernel agreement this far below the quantization agreement is called out
AGREEMENT_GAP = 0.01
#: ... and, for outputs without classes, an SQNR this many dB lower
SQNR_GAP_DB = 6.0


class BelowTargetError(QuantizeError):
    """The INT8 graph misses its target agreement; nothing was written.

    Attributes:
        report: the :class:`~bnexport.quantize.report.QuantizeReport` of the refused graph.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


def resolve_target(
    target_agreement: float | str | None, metrics: Sequence[OutputMetrics], rows: int
) -> tuple[float | None, str]:
    """``(target, where it comes from)``: ``explicit``, ``default`` or why there is none."""
    if target_agreement is None:
        return None, "none requested"
    if target_agreement != "auto":
        return float(target_agreement), "explicit"
    if compare.primary_agreement(metrics) is None:
        return None, "no class-score output"
    if rows < MIN_TARGET_ROWS:
        return None, f"{rows} evaluation rows (default target from {MIN_TARGET_ROWS})"
    return DEFAULT_TARGET, "default"


@dataclasses.dataclass
class KernelCheck:
    """The INT8 graph as this host's kernels run it (see the module docstring).

    Attributes:
        source: what computed it, in words.
        emulated: predicted by the NumPy emulation of non-VNNI kernels (not measured).
        outputs: per-output error against the float32 graph.
        cpu: :meth:`~bnexport.runtime.cpu_features.Int8Features.to_dict` of this CPU.
    """

    source: str
    emulated: bool
    outputs: list[OutputMetrics]
    cpu: dict[str, Any]

    @property
    def top1_agreement(self) -> float | None:
        """Top-1 agreement of the first class-score output."""
        return compare.primary_agreement(self.outputs)


def kernel_session(model: Any) -> tuple[Any, str, bool]:
    """``(session, source, emulated)`` that runs ``model`` as the int8 kernels here would."""
    from bnexport.runtime.cpu_features import cpu_int8_features, hardware_int8_features

    features = cpu_int8_features()
    if features.may_saturate and hardware_int8_features().int32_dot:
        from bnexport.quantize.kernel_emulation import EmulatedSession

        return EmulatedSession(model), f"emulated non-VNNI int8 kernels [{features.source}]", True
    return compare.make_session(model), "onnxruntime int8 kernels on this CPU", False


def measure_kernels(
    model: Any, batches: Sequence[dict[str, Any]], reference: dict[str, Any]
) -> KernelCheck:
    """Run ``model`` on this host's kernels (or their emulation) and compare with float32."""
    from bnexport.runtime.cpu_features import cpu_int8_features

    session, source, emulated = kernel_session(model)
    got = compare.run_batches(session, batches, list(reference))
    return KernelCheck(
        source, emulated, compare.compare_outputs(got, reference), cpu_int8_features().to_dict()
    )


def _worse(quant: Sequence[OutputMetrics], kernel: KernelCheck) -> str | None:
    """How the kernels are worse than the graph's semantics, or ``None``."""
    q_top1, k_top1 = compare.primary_agreement(quant), kernel.top1_agreement
    if q_top1 is not None and k_top1 is not None:
        if k_top1 < q_top1 - AGREEMENT_GAP:
            return f"agreement {k_top1:.1%} against {q_top1:.1%} for the Q/DQ graph"
        return None
    for q, k in zip(quant, kernel.outputs, strict=True):
        if k.sqnr_db < q.sqnr_db - SQNR_GAP_DB:
            return f"SQNR {k.sqnr_db:.1f} dB on {k.name!r} against {q.sqnr_db:.1f} dB"
    return None


def kernel_warning(
    model: Any, quant: Sequence[OutputMetrics], kernel: KernelCheck, target: str
) -> str | None:
    """One warning naming the cause and the way out when the kernels lose accuracy."""
    from bnexport.runtime.cpu_features import cpu_int8_features
    from bnexport.runtime.int8_kernels import saturation_risk

    worse = _worse(quant, kernel)
    features = cpu_int8_features()
    risk = saturation_risk(model) if features.may_saturate or worse else None
    if worse is None:
        if risk is None or not risk.may_saturate:
            return None
        # nothing lost on these inputs, but the kernels can saturate on others
        top1 = kernel.top1_agreement
        seen = f"agreement {top1:.1%} here" if top1 is not None else "no loss seen here"
        return (
            f"this CPU {_cpu_phrase(features)}: onnxruntime's int8 kernels can saturate on "
            f"this graph ({len(risk.nodes)} layer(s) with |w_q| > 64; {seen}, "
            f"{kernel.source}); for CPU serving quantize with `--target cpu` (7-bit weights)"
        )
    assert risk is not None
    if features.may_saturate and risk.may_saturate:
        way_out = (
            "serve it with TensorRT, or quantize with `--target cpu` for CPU serving"
            if target == "tensorrt"
            else "drop `--full-range-weights` (7-bit weights cannot saturate)"
        )
        return (
            f"this CPU {_cpu_phrase(features)}: onnxruntime's int8 kernels saturate on this graph "
            f"({worse}; {len(risk.nodes)} layer(s) with |w_q| > 64, int16 pair sums); {way_out}"
        )
    return (
        f"{kernel.source} lose accuracy on this graph ({worse}) although no int16 "
        "saturation is expected here; compare with `bnexport parity` and report it"
    )


def _cpu_phrase(features: Any) -> str:
    if features.overridden:
        return f"is treated as non-VNNI ({features.source})"
    return "has no VNNI/AVX-VNNI/AMX"


def below_target_message(
    agreement: float | None,
    target: float,
    origin: str,
    *,
    where: str,
    target_kind: str,
) -> str:
    """Why the graph is refused and what to try (one line)."""
    got = "no top-1 agreement" if agreement is None else f"top-1 agreement {agreement:.2%}"
    default = " (the default for class-score outputs)" if origin == "default" else ""
    tries = [
        "`--target-agreement FRACTION` to keep the most sensitive nodes in float32",
        "`--exclude NODE...`",
        "`--method entropy` or `percentile`",
    ]
    if target_kind == "tensorrt":
        tries.insert(2, "`--target cpu` (uint8 activations, for CPU serving)")
    return (
        f"{got} {where} is below the target {target:.2%}{default}; nothing was written. "
        f"Try {', '.join(tries)}; or pass `--keep-below-target` (keep_below_target=True) "
        "to write it anyway"
    )
