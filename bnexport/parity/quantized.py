"""Which layers of an INT8 (QDQ) graph lose most, and which ONNX nodes to keep in float32.

In a quantized graph every layer's error includes the error of everything upstream, so
the layers at the end always look worst. What a layer *adds* is what matters for
``bnexport quantize --exclude``: for each compared layer ``L`` with tensor ``t``,

    NMSE(L)  = Σ(onnx_t − keras_L)² / Σ keras_L²            (per-layer parity)
    added(L) = NMSE(L) − max NMSE(U) over U ∈ upstream(L)

where ``upstream(L)`` are the nearest compared layers found walking the ONNX graph back
from ``t`` (graph inputs count as exact, NMSE 0). Each entry names the quantizable
nodes (``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``: the ops ``bnexport quantize``
puts Q/DQ on) met on that walk: those are the names ``quantize(..., exclude=[...])``
takes, since quantization keeps the float graph's node names.

Only layers with such nodes are ranked: that is where INT8 loses information (their
quantized inputs and weights). A layer without one (ReLU, pooling, a BN folded away)
only carries its upstream error on, and a nonlinearity can change a relative error by
itself (a ReLU that zeroes part of a tensor raises its NMSE), which is not a loss that
keeping anything in float32 would remove.

Limits: ``added`` is a first-order attribution read off one run of the quantized graph.
A layer whose output carries little energy relative to its input (logits centered by a
bias, a projection to a near-zero residual) shows the upstream *absolute* error as a
large relative one and can rank above the layer that caused it. For an isolated measure
per node (quantize only that node), use ``bnexport quantize --target-agreement``, whose
search ranks nodes that way; this list is the fast first look from a parity run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

#: op types that carry Q/DQ in a bnexport INT8 graph (``bnexport.quantize``'s default)
QUANTIZABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass
class LayerLoss:
    """One layer's share of the INT8 error.

    Attributes:
        layer: Keras layer name.
        tensor: ONNX tensor compared.
        nmse: normalized squared error of the layer's output.
        added_nmse: ``nmse`` minus the largest NMSE of its upstream compared layers.
        upstream: those upstream layers (empty: fed by graph inputs).
        nodes: quantizable ONNX nodes between them and this layer (``exclude`` names).
    """

    layer: str
    tensor: str
    nmse: float
    added_nmse: float
    upstream: list[str] = dataclasses.field(default_factory=list)
    nodes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def _walk_back(
    tensor: str,
    producers: Mapping[str, Any],
    stops: Mapping[str, str],
) -> tuple[list[str], list[str]]:
    """``(upstream layers, quantizable nodes)`` met walking back from ``tensor``.

    Stops at tensors of other compared layers (``stops``: tensor -> layer), graph inputs
    and initializers (no producer).
    """
    upstream: list[str] = []
    nodes: list[str] = []
    seen: set[str] = set()
    frontier = [tensor]
    while frontier:
        current = frontier.pop()
        node = producers.get(current)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in QUANTIZABLE_OPS and node.name:
            nodes.append(node.name)
        for name in node.input:
            if not name:
                continue
            if name in stops and name != tensor:
                if stops[name] not in upstream:
                    upstream.append(stops[name])
                continue
            frontier.append(name)
    return upstream, nodes


def rank_layer_losses(model: Any, layers: Sequence[Any]) -> list[LayerLoss]:
    """Rank the compared layers of an INT8 graph by the error they add, largest first.

    Args:
        model: the ``onnx.ModelProto`` that ran.
        layers: :class:`bnexport.parity.report.LayerResult` entries (skipped ones ignored).

    Returns:
        One :class:`LayerLoss` per compared layer with quantizable nodes, sorted by
        ``added_nmse`` descending.
    """
    compared = [r for r in layers if r.comparison is not None]
    producers = {out: node for node in model.graph.node for out in node.output if out}
    stops = {r.tensor: r.layer for r in compared}
    nmse = {r.layer: float(r.comparison.nmse) for r in compared}
    losses = []
    for r in compared:
        upstream, nodes = _walk_back(r.tensor, producers, stops)
        if not nodes:
            continue
        base = max((nmse[u] for u in upstream), default=0.0)
        losses.append(
            LayerLoss(r.layer, r.tensor, nmse[r.layer], nmse[r.layer] - base, upstream, nodes)
        )
    return sorted(losses, key=lambda loss: -loss.added_nmse)


def exclude_candidates(losses: Sequence[LayerLoss], k: int = 3) -> list[str]:
    """Quantizable nodes of the ``k`` top-ranked layers that add error and have such nodes."""
    names: list[str] = []
    for loss in [x for x in losses if x.added_nmse > 0][:k]:
        names.extend(n for n in loss.nodes if n not in names)
    return names


def quantization_check(
    model: Any,
    feed: Mapping[str, Any],
    reference: Mapping[str, Any],
    pairs: Sequence[tuple[str, str]],
    compare: Any,
    kernel_top1: float | None,
) -> tuple[list[Any], str]:
    """The Q/DQ graph's own error (run as float), and a note when the kernels lose more.

    ``model`` runs on onnxruntime with graph optimizations off, so ``QuantizeLinear``/
    ``DequantizeLinear`` and float ops compute exactly what the graph states (what
    TensorRT computes); ``compare(name, ref, got)`` judges each output as the backend's
    outputs were judged. The note names the cause when the backend's (int8 kernels')
    top-1 agreement ``kernel_top1`` is more than a point below this one.

    Returns:
        ``(comparisons, note)``.
    """
    import numpy as np

    from bnexport.quantize.compare import make_session
    from bnexport.runtime.int8_kernels import load_time_warning

    session = make_session(model, optimize=False)
    wanted = {i.name: i.type for i in session.get_inputs()}
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64}
    inputs = {
        k: np.asarray(v, dtypes.get(wanted[k])) if wanted[k] in dtypes else np.asarray(v)
        for k, v in feed.items()
        if k in wanted
    }
    names = [onnx_name for _, onnx_name in pairs]
    got = dict(zip(names, session.run(names, inputs), strict=True))
    comparisons = [compare(o, reference[k], got[o]) for k, o in pairs]
    top1 = [c.top1 for c in comparisons if c.top1 is not None]
    quant_top1 = min(top1) if top1 else None
    note = ""
    if kernel_top1 is not None and quant_top1 is not None and kernel_top1 < quant_top1 - 0.01:
        cause = load_time_warning(model)
        note = (
            f"onnxruntime's int8 kernels agree {kernel_top1:.1%} against {quant_top1:.1%} for "
            "the Q/DQ graph itself; "
            + (cause or "no int16 saturation is expected on this CPU: report it")
        )
    return comparisons, note
