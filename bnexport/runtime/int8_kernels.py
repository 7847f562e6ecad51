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
zero points add nothing to the saturation. Which two products form a pair is the kernel's
packing order: adjacent ``K`` of the NHWC im2col order ``(kh, kw, c)`` for ``Conv`` (so
in a 1- or 3-channel stem a pair spans two neighbouring pixels), adjacent ``K`` for
``Gemm``/``MatMul`` (:mod:`bnexport.quantize.kernel_emulation` names the kernels).

onnxruntime has the way out built in: the session option :data:`PRECISION_MODE_KEY`
(``session.x64quantprecision``, ``kOrtSessionOptionsAvx2PrecisionMode``: "x64
SSE4.1/AVX2/AVX512 (with no VNNI) has overflow problem with quantized matrix
multiplication with U8S8 ... use slower U8U8") makes ``QDQS8ToU8Transformer`` and
``Avx2WeightS8ToU8Transformer`` (``core/optimizer/qdq_transformer/``) convert to uint8 the
int8 weights of every ``QLinearConv``/``QGemm``/``MatMulInteger``/... layer with a weight
outside ``[−64, 64]`` (``w ^ 0x80``, zero point + 128), so those layers run MLAS's u8u8
kernels (``vpmaddwd`` on 16-bit operands: exact) and the others stay u8s8, which cannot
saturate. It counts where ``MlasPlatformU8S8Overflow()`` (every x86 CPU with AVX2) and
costs speed (no ``vpmaddubsw``, no ``ConvSym`` path for the converted layers).

- :func:`saturating_dot` is that sum in NumPy (any host), for the kernel emulation of
  :mod:`bnexport.quantize.kernel_emulation` and its tests;
- :func:`saturation_risk` reads a Q/DQ graph's int8 weights once (no inference);
- :func:`apply_precision_mode`: sets :data:`PRECISION_MODE_KEY` in the onnxruntime
  ``SessionOptions`` for such a graph on such an x86 CPU (unless the caller set it);
  :func:`bnexport.runtime.ort_session.make_session` does so on the CPU provider, for
  ``bnexport.Session`` and every other caller; :func:`precision_mode_on` reads it back;
- :func:`load_time_warning` / :func:`warn_if_saturating`: the one warning line that
  ``Session``, ``run``, ``serve`` and ``parity`` log for such a graph on such a CPU
  (:func:`bnexport.runtime.cpu_features.cpu_int8_features`), saying which of the two
  happens (saturating kernels, or the exact and slower u8u8 mode).
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
#: onnxruntime session config entry that runs saturating int8 layers as u8u8 (x86 only)
PRECISION_MODE_KEY = "session.x64quantprecision"
#: ``platform.machine()`` values where onnxruntime compiles :data:`PRECISION_MODE_KEY` in
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@dataclasses.dataclass
class SaturationStats:
    """What int16 saturation did to one layer's accumulators (summed over calls).

    Attributes:
        accumulators: int32 sums computed (``rows × columns``).
        changed: how many of them saturation changed.
        max_lost: the largest ``|exact − saturated|`` of one sum.
        max_exact: the largest ``|exact|`` (the scale ``max_lost`` is judged against).
    """

    accumulators: int = 0
    changed: int = 0
    max_lost: int = 0
    max_exact: int = 0

    @property
    def fraction(self) -> float:
        """Share of the accumulators that saturation changed."""
        return self.changed / self.accumulators if self.accumulators else 0.0


def saturating_dot(
    a: np.ndarray,
    w: np.ndarray,
    *,
    max_elements: int = 1 << 24,
    stats: SaturationStats | None = None,
) -> np.ndarray:
    """``Σ_j sat16(a_{2j}·w_{2j} + a_{2j+1}·w_{2j+1})`` for every row of ``a`` and column of ``w``.

    Args:
        a: uint8 activations as integers in ``[0, 255]``, shape ``[R, K]``.
        w: int8 weights as integers in ``[−128, 127]``, shape ``[K, M]``.
        max_elements: bound on the temporary ``[rows, risky pairs]`` array.
        stats: if given, what saturation changed is added to it.

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
    if stats is not None:
        stats.accumulators += exact.size
        stats.max_exact = max(stats.max_exact, int(np.abs(exact).max(initial=0)))
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
            if stats is not None:
                stats.changed += int(np.count_nonzero(correction))
                stats.max_lost = max(stats.max_lost, int(np.abs(correction).max()))
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
    risk: SaturationRisk,
    features: Int8Features,
    what: str = "this graph",
    *,
    precision_mode: bool = False,
) -> str:
    """The one-line explanation of kernel saturation, naming the cause and the way out.

    ``precision_mode``: the session runs with :data:`PRECISION_MODE_KEY` set, so the
    layers are exact and the line says what that costs instead.
    """
    first, peak = next(iter(risk.nodes.items()))
    cpu = "has no VNNI/AVX-VNNI/AMX" if not features.overridden else "is treated as non-VNNI"
    layers = (
        f"({len(risk.nodes)} of {risk.checked} int8 layer(s) have weights beyond "
        f"±{SAFE_WEIGHT_MAX}, first {first!r} with |w| {peak})"
    )
    if precision_mode:
        return (
            f"this CPU {cpu} ({features.describe()}): onnxruntime's u8s8 int8 kernels would "
            f"saturate on {what} {layers}, so bnexport runs it with {PRECISION_MODE_KEY}=1 "
            "(onnxruntime's exact but slower u8u8 kernels for those layers); for fast CPU "
            "serving quantize with "
            "`bnexport quantize --target cpu` (7-bit weights), or serve it with TensorRT"
        )
    return (
        f"this CPU {cpu} ({features.describe()}): onnxruntime's int8 kernels can saturate "
        f"on {what} {layers}; serve it with TensorRT, or quantize with "
        "`bnexport quantize --target cpu` (7-bit weights) for CPU serving"
    )


def _risk_here(
    model: Any, features: Int8Features | None
) -> tuple[SaturationRisk, Int8Features] | None:
    """``(risk, features)`` when ``model``'s int8 kernels can saturate here, else ``None``."""
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return None  # float graphs: not even the environment is read
    features = features or cpu_int8_features()
    if not features.may_saturate:
        return None
    risk = saturation_risk(model)
    return (risk, features) if risk.may_saturate else None


def apply_precision_mode(
    model: Any, options: Any = None, features: Int8Features | None = None
) -> tuple[Any, bool]:
    """Ask onnxruntime for exact u8u8 kernels where this CPU's u8s8 ones saturate on ``model``.

    It applies where it matters and exists: a Q/DQ graph with int8 weights beyond
    :data:`SAFE_WEIGHT_MAX`, on an x86 CPU whose int8 kernels may saturate (or
    ``BNEXPORT_CPU_INT8=novnni``). On a VNNI CPU the option would only slow the graph
    down, and on other architectures onnxruntime does not compile it in.

    Args:
        model: the ``onnx.ModelProto``.
        options: the caller's ``onnxruntime.SessionOptions`` (``None``: a new one is made
            where needed). :data:`PRECISION_MODE_KEY` is added to them unless they set it
            already: ``"0"`` there is the caller's way to keep the fast, saturating kernels.
        features: the CPU's int8 features (default: :func:`cpu_int8_features`).

    Returns:
        ``(options, on)``: the options to create the session with (``options`` itself, or a
        new object) and whether :data:`PRECISION_MODE_KEY` is ``"1"`` in them.
    """
    found = _risk_here(model, features)
    if found is None or found[1].machine.lower() not in X86_MACHINES:
        return options, False
    if options is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
    try:
        options.get_session_config_entry(PRECISION_MODE_KEY)
    except RuntimeError:  # not set by the caller
        options.add_session_config_entry(PRECISION_MODE_KEY, "1")
    return options, precision_mode_on(options)


def precision_mode_on(options: Any) -> bool:
    """Whether onnxruntime ``SessionOptions`` set :data:`PRECISION_MODE_KEY` to ``"1"``."""
    try:
        return options.get_session_config_entry(PRECISION_MODE_KEY) == "1"
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return False


def load_time_warning(
    model: Any, features: Int8Features | None = None, *, precision_mode: bool = False
) -> str | None:
    """The warning for running ``model`` on onnxruntime's CPU kernels here, or ``None``.

    ``None`` unless the graph is quantized, some int8 weight exceeds
    :data:`SAFE_WEIGHT_MAX` and the CPU (or ``BNEXPORT_CPU_INT8``) says the kernels may
    saturate. ``precision_mode``: the session sets :data:`PRECISION_MODE_KEY`.
    """
    found = _risk_here(model, features)
    if found is None:
        return None
    return saturation_message(*found, precision_mode=precision_mode)


def warn_if_saturating(model: Any, name: str, *, precision_mode: bool = False) -> str | None:
    """Log :func:`load_time_warning` for ``model`` (once, as one line); return it."""
    message = load_time_warning(model, precision_mode=precision_mode)
    if message is not None:
        LOGGER.warning("%s: %s", name, message)
    return message
