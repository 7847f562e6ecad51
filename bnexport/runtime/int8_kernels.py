"""The int16-saturation rule of x86 int8 kernels without VNNI, and a graph's exposure to it.

onnxruntime runs a Q/DQ ``Conv``/``Gemm``/``MatMul`` (input and weight from
``DequantizeLinear``) as an integer kernel: ``acc = Σ_k a_k·w_k`` over uint8 activations
``a`` (int8 activations are shifted by +128, with zero point ``z + 128``) and int8 weights
``w``, then ``y = s_x·s_w·(acc − z·Σ_k w_k) + b``. Without VNNI/AVX-VNNI/AMX the x86 kernels
form the sum with ``vpmaddubsw``, which adds two adjacent products into a saturating int16::

    acc = Σ_j sat16(a_{2j}·w_{2j} + a_{2j+1}·w_{2j+1}),   sat16(v) = clip(v, −32768, 32767)

(then ``vpmaddwd`` with ones adds the int16 pairs into int32 exactly). With ``a ≤ 255`` a
pair reaches ``255·(|w_{2j}| + |w_{2j+1}|)``, so it cannot saturate when every
``|w| ≤ 64`` (``255·64·2 = 32,640 ≤ 32,767``): :data:`SAFE_WEIGHT_MAX`. onnxruntime's
``reduce_range`` weights (int8 in ``[−64, 64]``) meet it; full-range weights (up to ±127)
do not. The zero-point term ``z·Σw`` is computed exactly (column sums), so padding and
zero points add nothing to the saturation.

- :func:`saturating_dot` is that sum in NumPy (any host), for the kernel emulation of
  :mod:`bnexport.quantize.kernel_emulation` and its tests;
- :func:`saturation_risk` reads a Q/DQ graph's int8 weights once (no inference);
- :func:`load_time_warning` / :func:`warn_if_saturating`: the one warning line that
  ``Session``, ``run``, ``serve`` and ``parity`` log for such a graph on such a CPU
  (:func:`bnexport.runtime.cpu_features.cpu_int8_features`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from bnexport.runtime.cpu_features import Int8Features, cpu_int8_features

#: largest |int8 weight| whose pair sums with uint8 activations fit int16 (255·64·2 ≤ 32767)
SAFE_WEIGHT_MAX = 64
#: op types onnxruntime runs as integer kernels when fed by DequantizeLinear
LINEAR_OPS = frozenset({"Conv", "Gemm", "MatMul"})
INT16_MIN, INT16_MAX = -32768, 32767
#: the logger of the load-time warning
LOGGER = logging.getLogger("bnexport.int8")


def saturating_dot(a: np.ndarray, w: np.ndarray, *, max_elements: int = 1 << 24) -> np.ndarray:
    """``Σ_j sat16(a_{2j}·w_{2j} + a_{2j+1}·w_{2j+1})`` for every row of ``a`` and column of ``w``.

    Args:
        a: uint8 activations as integers in ``[0, 255]``, shape ``[R, K]``.
        w: int8 weights as integers in ``[−128, 127]``, shape ``[K, M]``.
        max_elements: bound on the temporary ``[rows, risky pairs]`` array.

    Returns:
        int64 ``[R, M]``: the exact product ``a @ w`` minus what int16 saturation removes.
        Only pairs whose bound ``255·(|w_{2j}| + |w_{2j+1}|)`` exceeds 32,767 are
        evaluated pairwise; the rest cannot saturate.
    """
    a = np.asarray(a, np.int64)
    w = np.asarray(w, np.int64)
    k = a.shape[1]
    if k % 2:  # the kernels pad K with zero weights
        a = np.concatenate([a, np.zeros((a.shape[0], 1), np.int64)], axis=1)
        w = np.concatenate([w, np.zeros((1, w.shape[1]), np.int64)], axis=0)
    exact = np.rint(a.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)
    even, odd = w[0::2], w[1::2]  # [K/2, M]
    bound = 255 * (np.abs(even) + np.abs(odd))
    pair_j, col_m = np.nonzero(bound > INT16_MAX)
    if pair_j.size == 0:
        return exact
    a_even, a_odd = a[:, 0::2], a[:, 1::2]
    w_even, w_odd = even[pair_j, col_m], odd[pair_j, col_m]  # [P]
    step = max(1, max_elements // pair_j.size)
    for start in range(0, a.shape[0], step):
        rows = slice(start, start + step)
        pairs = a_even[rows][:, pair_j] * w_even + a_odd[rows][:, pair_j] * w_odd  # [r, P]
        lost = pairs - np.clip(pairs, INT16_MIN, INT16_MAX)
        if lost.any():
            correction = np.zeros((lost.shape[0], w.shape[1]), np.int64)
            np.add.at(correction.T, col_m, lost.T)
            exact[rows] -= correction
    return exact


@dataclasses.dataclass
class SaturationRisk:
    """Which integer-kernel nodes of a Q/DQ graph have weights beyond :data:`SAFE_WEIGHT_MAX`.

    Attributes:
        nodes: ``{node name: max |w_q|}`` of DQ-fed linear nodes with 8-bit activations
            and int8 weights above the bound (in graph order).
        checked: how many such nodes were read.
        max_abs_weight: the largest ``|w_q|`` over them (0: none read).
    """

    nodes: dict[str, int] = dataclasses.field(default_factory=dict)
    checked: int = 0
    max_abs_weight: int = 0

    @property
    def may_saturate(self) -> bool:
        """Some int8 kernel of the graph can saturate on a CPU without VNNI."""
        return bool(self.nodes)


def _dq_inputs(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    init = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    return init, producer


def saturation_risk(model: Any) -> SaturationRisk:
    """Read every DQ-fed ``Conv``/``Gemm``/``MatMul`` weight of ``model`` once (main graph).

    A node counts when its input 0 is ``DequantizeLinear`` of a uint8/int8 activation
    (not an initializer) and its input 1 ``DequantizeLinear`` of an int8 initializer.
    """
    from onnx import TensorProto, numpy_helper

    init, producer = _dq_inputs(model)
    eight_bit = (TensorProto.UINT8, TensorProto.INT8)
    risk = SaturationRisk()
    for node in model.graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2:
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.input[0] in init:
            continue
        if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        weight = init.get(w_dq.input[0])
        if weight is None or weight.data_type != TensorProto.INT8:
            continue
        x_zero = init.get(x_dq.input[2]) if len(x_dq.input) > 2 else None
        if x_zero is not None and x_zero.data_type not in eight_bit:
            continue
        risk.checked += 1
        peak = int(np.abs(numpy_helper.to_array(weight).astype(np.int16)).max(initial=0))
        risk.max_abs_weight = max(risk.max_abs_weight, peak)
        if peak > SAFE_WEIGHT_MAX:
            risk.nodes[node.name or f"{node.op_type}#{risk.checked}"] = peak
    return risk


def saturation_message(
    risk: SaturationRisk, features: Int8Features, what: str = "this graph"
) -> str:
    """The one-line explanation of kernel saturation, naming the cause and the way out."""
    first, peak = next(iter(risk.nodes.items()))
    cpu = "has no VNNI/AVX-VNNI/AMX" if not features.overridden else "is treated as non-VNNI"
    return (
        f"this CPU {cpu} ({features.describe()}): onnxruntime's int8 kernels can saturate "
        f"on {what} ({len(risk.nodes)} of {risk.checked} int8 layer(s) have weights beyond "
        f"±{SAFE_WEIGHT_MAX}, first {first!r} with |w| {peak}); serve it with TensorRT, or "
        "quantize with `bnexport quantize --target cpu` (7-bit weights) for CPU serving"
    )


def load_time_warning(model: Any, features: Int8Features | None = None) -> str | None:
    """The warning for running ``model`` on onnxruntime's CPU kernels here, or ``None``.

    ``None`` unless the graph is quantized, some int8 weight exceeds
    :data:`SAFE_WEIGHT_MAX` and the CPU (or ``BNEXPORT_CPU_INT8``) says the kernels may saturate.
    """
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return None  # float graphs: not even the environment is read
    features = features or cpu_int8_features()
    if not features.may_saturate:
        return None
    risk = saturation_risk(model)
    return saturation_message(risk, features) if risk.may_saturate else None


def warn_if_saturating(model: Any, name: str) -> str | None:
    """Log :func:`load_time_warning` for ``model`` (once, as one line); return it."""
    message = load_time_warning(model)
    if message is not None:
        LOGGER.warning("%s: %s", name, message)
    return message
