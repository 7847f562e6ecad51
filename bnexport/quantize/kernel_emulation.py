"""Run a Q/DQ graph as x86 int8 kernels without VNNI would, on any host (NumPy).

onnxruntime offers no switch to force its non-VNNI kernels on a VNNI CPU, so the kernel
error a graph would have on such a CPU is *predicted* here: every DQ-fed
``Conv``/``Gemm``/``MatMul`` (8-bit activation, int8 weight initializer) becomes one
node that computes the integer kernel with int16 pair saturation
(:func:`bnexport.runtime.int8_kernels.saturating_dot`)::

    y = s_x · s_w[m] · (Σ_j sat16(a_{2j}w_{2j} + a_{2j+1}w_{2j+1}) − z'·Σ_k w_k) + b

with ``a = x_q`` for uint8 activations and ``a = x_q + 128``, ``z' = z + 128`` for int8
ones. That is what onnxruntime 1.32 runs on x86 for the Q/DQ graph (read from its
source; :func:`conv_path` names the files):

- on x86 ``QDQIsInt8Allowed()`` is false, so ``QDQS8ToU8Transformer`` rewrites every
  int8 activation Q/DQ pair to uint8 with zero point ``z + 128`` before the fusion; the
  weights stay int8 (unless ``session.x64quantprecision`` is set, which this module does
  not model: see :func:`bnexport.runtime.int8_kernels.apply_precision_mode`);
- ``QDQSelectorActionTransformer`` fuses ``DQ → Conv → Q`` into ``QLinearConv`` and
  ``DQ → Gemm`` into ``QGemm`` (``MatMul``: ``QLinearMatMul``/``MatMulIntegerToFloat``),
  all u8 × s8 MLAS kernels that form the products with ``vpmaddubsw`` on AVX2;
- a pair is two adjacent ``K`` of the order the kernel packs: for ``Conv`` the NHWC
  im2col order ``(kh, kw, c)``, both on the indirect ``ConvSym`` path (4 channels of one
  tap at a time) and on the im2col ``QGEMM`` path (``K`` packed 4 at a time); for a stem
  with an odd channel count (a grayscale or RGB image) a pair therefore spans two taps,
  e.g. two neighbouring pixels. ``Gemm``/``MatMul`` pair adjacent ``K``; depthwise
  convolutions have no pairs and run exactly. The zero-point terms (``z'·Σw``, row and
  column sums) are exact int32 arithmetic outside the pairs.

Everything else (Q/DQ, activations, pooling) runs in ``onnx.reference`` as the graph
states it (at opset 21 at least: ``onnx.reference`` implements Q/DQ from opset 19 on,
and the ops a quantized CNN uses mean the same from 13 to 21). onnxruntime also fuses the
requantization into its kernels and moves some Q/DQ around ``Relu``/``MaxPool``; that
changes roundings (one output step), not the saturation, so the result tracks the real
kernels to within requantization rounding where nothing saturates and shows the
saturation where it happens. It is a prediction for a host without VNNI, reported as such.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from bnexport.runtime.int8_kernels import LINEAR_OPS, SaturationStats, saturating_dot

DOMAIN = "bnexport.emulate"


def _nhwc_cols(x: np.ndarray, kernel: Sequence[int], attrs: dict[str, Any], pad: int) -> Any:
    """im2col of NCHW ``x`` with channels innermost: ``([N·Ho·Wo, kh·kw·C], Ho, Wo)``."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = attrs.get("strides") or (1, 1)
    dh, dw = attrs.get("dilations") or (1, 1)
    top, left, bottom, right = attrs.get("pads") or (0, 0, 0, 0)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad)
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    taps = [
        xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]  # each [N, C, Ho, Wo]
    cols = np.stack(taps, axis=1)  # [N, T, C, Ho, Wo]
    cols = cols.transpose(0, 3, 4, 1, 2).reshape(n * ho * wo, kh * kw * c)
    return cols, ho, wo


def conv_path(group: int, in_channels: int, out_channels: int) -> str:
    """Which MLAS kernel onnxruntime's ``QLinearConv`` runs (u8 activations, s8 weights, x86).

    ``in_channels``/``out_channels`` are per group. The rule is ``QLinearConv::PrePack``
    → ``TryConvSymPrepack`` (weights symmetric, ``providers/cpu/quantization/
    qlinearconv.cc``) and ``MlasConvSymPackWSize`` (``mlas/lib/convsym.cpp``) with
    ``MlasConvSymDispatchAvx2`` (``KernelInputChannelAlignment`` 4,
    ``KernelOutputChannelAlignment`` 8, ``FilterOutputChannelPackCount`` 16):

    - ``"depthwise"``: one input and one output channel per group (16/32-bit products,
      no pairs: exact);
    - ``"convsym"``: group 1, input channels a multiple of 4, output channels a multiple
      of 8 and at least 16: ``MlasConvSymKernelAvx2`` (``mlas/lib/x86_64/
      ConvSymKernelAvx2.S``, ``MultiplyAccumulateRowAvx2``: ``vpbroadcastd`` of 4 input
      channels of one tap, ``vpmaddubsw``, ``vpmaddwd`` by 1): a pair is two adjacent
      channels of one tap;
    - ``"qgemm"``: everything else, e.g. a 1- or 3-channel stem: NHWC im2col and
      ``MlasGemm`` u8s8 (``QgemmU8X8KernelAvx2.S``, ``MultiplyAccumulateRowU8S8Avx2``,
      same instruction pair) over ``K = kh·kw·C`` in ``(kh, kw, c)`` order packed 4 at a
      time: a pair is two adjacent ``K``, across taps when ``C`` is odd.

    Both non-depthwise paths therefore pair adjacent ``K`` of the flat ``(kh, kw, c)``
    order; the path is named for reports and tests. (AVX-512BW without VNNI,
    ``MlasConvSymDispatchAvx512Core``, relaxes the output-channel rule to multiples of 4
    and pairs the same products.)
    """
    if in_channels == 1 and out_channels == 1 and group > 1:
        return "depthwise"
    if group == 1 and in_channels % 4 == 0 and out_channels % 8 == 0 and out_channels >= 16:
        return "convsym"
    return "qgemm"


def _conv(
    a: np.ndarray,
    zero: int,
    wq: np.ndarray,
    attrs: dict[str, Any],
    stats: SaturationStats | None = None,
) -> np.ndarray:
    """Integer ``Conv`` (2-D, NCHW) of shifted uint8 ``a``; returns int64 ``[N, M, Ho, Wo]``.

    Pairs are adjacent ``K`` of the ``(kh, kw, c)`` im2col order (:func:`conv_path`);
    padded positions hold the zero point, as the kernels' padding vectors do.
    """
    group = int(attrs.get("group") or 1)
    m, cg, kh, kw = wq.shape
    n = a.shape[0]
    path = conv_path(group, cg, m // group)
    outs = []
    for g in range(group):
        a_g = a[:, g * cg : (g + 1) * cg]
        w_g = wq[g * (m // group) : (g + 1) * (m // group)]  # [Mg, Cg, kh, kw]
        cols, ho, wo = _nhwc_cols(a_g, (kh, kw), attrs, zero)
        w_cols = w_g.transpose(2, 3, 1, 0).reshape(kh * kw * cg, -1)  # [(kh, kw, c), Mg]
        if path == "depthwise":  # 16/32-bit products: no pairs
            acc = np.rint(cols.astype(np.float64) @ w_cols.astype(np.float64)).astype(np.int64)
            if stats is not None:
                stats.accumulators += acc.size
        else:  # adjacent K of the (kh, kw, c) order; K padded at the end with zero weights
            acc = saturating_dot(cols, w_cols, stats=stats)
        acc -= zero * w_cols.sum(axis=0, dtype=np.int64)[None, :]
        outs.append(acc.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2))
    return np.concatenate(outs, axis=1)


def _make_op(stats: dict[str, SaturationStats]) -> Any:
    """The ``onnx.reference`` op class; each node adds to ``stats[node name]``."""
    from onnx.reference.op_run import OpRun

    class SaturatingLinear(OpRun):
        """``Conv``/``Gemm``/``MatMul`` of DQ(x_q) and DQ(w_q) as a non-VNNI int8 kernel."""

        op_domain = DOMAIN

        def _run(self, xq, x_scale, x_zero, wq, w_scale, bias=None, **_: Any):  # noqa: ANN001
            kind = self.kind.decode() if isinstance(self.kind, bytes) else self.kind
            layer = stats.setdefault(
                self.onnx_node.name or self.onnx_node.output[0], SaturationStats()
            )
            shift = 128 if xq.dtype == np.int8 else 0
            a = xq.astype(np.int64) + shift
            zero = int(np.asarray(x_zero).reshape(-1)[0]) + shift if x_zero is not None else shift
            w = wq.astype(np.int64)
            attrs = {
                key: list(getattr(self, key))
                for key in ("pads", "strides", "dilations")
                if getattr(self, key, None) is not None
            }
            attrs["group"] = getattr(self, "group", 1)
            w_axis = int(getattr(self, "w_axis", 0))
            if kind == "Conv":
                acc = _conv(a, zero, w, attrs, layer).astype(np.float64)
                scale_shape = (1, -1, 1, 1)
            else:
                if kind == "Gemm" and int(getattr(self, "transB", 0)):
                    w = w.T
                    w_axis = 1 - w_axis
                lead = a.shape[:-1]
                flat = a.reshape(-1, a.shape[-1])
                acc = saturating_dot(flat, w, stats=layer)
                acc -= zero * w.sum(axis=0, dtype=np.int64)[None, :]
                acc = acc.reshape(*lead, -1).astype(np.float64)
                scale_shape = (-1,)
            w_scale = np.asarray(w_scale, np.float64)
            if w_scale.size > 1 and kind == "Conv":
                w_scale = w_scale.reshape(scale_shape)
            y = acc * float(np.asarray(x_scale)) * w_scale
            if bias is not None:
                b = np.asarray(bias, np.float64)
                y = y + (b.reshape(1, -1, *([1] * (acc.ndim - 2))) if kind == "Conv" else b)
            if kind == "Gemm":
                alpha, beta = float(getattr(self, "alpha", 1.0)), float(getattr(self, "beta", 1.0))
                y = alpha * (y - (b if bias is not None else 0.0)) + (
                    beta * b if bias is not None else 0.0
                )
            return (y.astype(np.float32),)

    return SaturatingLinear


def emulated_model(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` with every DQ-fed linear node as a :data:`DOMAIN` kernel node.

    Returns:
        ``(model, names of the replaced nodes)``.
    """
    from onnx import TensorProto, helper

    out = copy.deepcopy(model)
    init = {t.name: t for t in out.graph.initializer}
    producer = {o: n for n in out.graph.node for o in n.output}
    replaced: list[str] = []
    nodes = []
    for node in out.graph.node:
        x_dq = producer.get(node.input[0]) if node.input else None
        w_dq = producer.get(node.input[1]) if len(node.input) > 1 else None
        weight = init.get(w_dq.input[0]) if w_dq is not None else None
        usable = (
            node.op_type in LINEAR_OPS
            and x_dq is not None
            and x_dq.op_type == "DequantizeLinear"
            and x_dq.input[0] not in init
            and w_dq.op_type == "DequantizeLinear"
            and weight is not None
            and weight.data_type == TensorProto.INT8
            and not any(a.name == "transA" and a.i for a in node.attribute)
            and (node.op_type != "Conv" or len(weight.dims) == 4)
        )
        if not usable:
            nodes.append(node)
            continue
        x_zero = x_dq.input[2] if len(x_dq.input) > 2 else ""
        inputs = [x_dq.input[0], x_dq.input[1], x_zero, w_dq.input[0], w_dq.input[1]]
        if len(node.input) > 2 and node.input[2]:
            inputs.append(node.input[2])
        w_axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(
            helper.make_node(
                "SaturatingLinear",
                inputs,
                list(node.output),
                name=node.name,
                domain=DOMAIN,
                kind=node.op_type,
                w_axis=w_axis,
                **{k: v for k, v in attrs.items() if k not in ("kernel_shape", "auto_pad")},
            )
        )
        replaced.append(node.name)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(op.domain == DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    for op in out.opset_import:  # onnx.reference implements Q/DQ from opset 19 on
        if op.domain in ("", "ai.onnx") and op.version < 21:
            op.version = 21
    return out, replaced


class EmulatedSession:
    """Runs :func:`emulated_model` of a Q/DQ graph with ``onnx.reference`` (``run`` like ORT).

    ``layer_stats`` says, per replaced node, how many int32 accumulators saturation
    changed and by how much (the per-layer view of the kernel error).
    """

    def __init__(self, model: Any) -> None:
        from onnx.reference import ReferenceEvaluator

        emulated, self.replaced = emulated_model(model)
        #: ``{node name: SaturationStats}`` of the emulated layers, summed over runs
        self.layer_stats: dict[str, SaturationStats] = {}
        self._evaluator = ReferenceEvaluator(emulated, new_ops=[_make_op(self.layer_stats)])
        self._outputs = [o.name for o in model.graph.output]

    def run(self, outputs: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs ``outputs`` (``None``: all) for ``feed``, as onnxruntime's ``run``."""
        names = list(outputs) if outputs is not None else self._outputs
        return [np.asarray(v) for v in self._evaluator.run(names, feed)]

    def get_outputs(self) -> list[Any]:
        """Output descriptors with a ``name`` (what :func:`compare.run_batches` reads)."""
        return [_Named(name) for name in self._outputs]


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name
