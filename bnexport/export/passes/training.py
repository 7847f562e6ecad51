"""Training-mode ``BatchNormalization`` (``training_mode=1``).

``fused_norm="onnx"`` leaves the node alone (it normalizes with batch statistics, which
no fold can express). ``fused_norm="plugin"`` maps it onto ``FusedNorm`` in
``mode="batch_stats"`` with the node's ``epsilon`` (spec default 1e-5), ``scale=γ``,
``shift=β``. When the running-statistics outputs are consumed the node gets
``return_stats=1`` and they are rebuilt exactly as ONNX defines them, from the
plugin's (biased) batch statistics::

    running_mean = input_mean · momentum + batch_mean · (1 − momentum)
    running_var  = input_var  · momentum + batch_var  · (1 − momentum)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnexport.export.passes.context import FoldContext, FoldPass
from bnexport.export.passes.fuse import find_activation, fused_norm_node, take_over_activation
from bnexport.export.passes.patterns import is_training_bn
from bnexport.graph.islands import cast_node
from bnexport.graph.utils import add_initializer, const_array, take_over


def _used(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()


def map_training_bn(graph: ir.Graph, node: ir.Node, ctx: FoldContext) -> tuple[str, str] | str:
    """Replace ``node`` by FusedNorm(batch_stats); return (target, note) or a refusal."""
    label = ctx.node_label(node)
    consts = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    if any(c is None for c in consts[:2]):
        return "gamma/beta are not constant initializers"
    stats_used = [_used(v) for v in node.outputs[1:3]]
    if any(stats_used) and any(c is None for c in consts[2:4]):
        return "running statistics are consumed but input mean/var are not constant"
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    momentum = node.attributes.get_float("momentum", 0.9)
    y = node.outputs[0]
    act = find_activation(y) if not any(stats_used) else None
    attrs: dict[str, int | float | str] = {
        "axis": 1,
        "mode": "batch_stats",
        "epsilon": epsilon,
        "return_stats": int(any(stats_used)),
    }
    if act is not None:
        attrs.update(activation=act.kind, alpha=act.alpha)
    gamma, beta = (np.asarray(c, np.float64) for c in consts[:2])
    fused = fused_norm_node(
        graph, ctx, node.inputs[0], gamma, beta, name=node.name or label,
        num_outputs=3 if any(stats_used) else 1, **attrs,
    )  # fmt: skip
    graph.insert_before(node, fused)
    if node.name:
        fused.name = node.name  # node is removed below
    namer = ctx.namer(graph)
    for k, used in enumerate(stats_used, start=1):
        if not used:
            continue
        running = node.outputs[k]
        start = consts[1 + k].astype(np.float64) * momentum
        mul = ir.node("Mul", [fused.outputs[k], add_initializer(
            graph, namer, np.full(1, 1.0 - momentum, np.float32), f"{fused.name}_1m_momentum"
        )], name=namer.fresh(f"{fused.name}_stat{k}_mul"))  # fmt: skip
        add = ir.node("Add", [mul.outputs[0], add_initializer(
            graph, namer, start.astype(np.float32), f"{fused.name}_stat{k}_start"
        )], name=namer.fresh(f"{fused.name}_stat{k}_add"))  # fmt: skip
        new_nodes = [mul, add]
        for n in new_nodes:
            n.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        out_dtype = running.dtype or ir.DataType.FLOAT
        if out_dtype != ir.DataType.FLOAT:
            new_nodes.append(cast_node(add.outputs[0], out_dtype, namer, f"{fused.name}_stat{k}"))
        graph.insert_after(fused, new_nodes)
        take_over(graph, running, new_nodes[-1].outputs[0])
    take_over_activation(graph, y, fused.outputs[0], act)
    note = "training-mode BN mapped onto FusedNorm batch_stats"
    return fused.name or "", note if act is None else f"{note}; {act.kind} absorbed"


class TrainingBatchNormPass(FoldPass):
    """Record (``onnx``) or map onto FusedNorm batch_stats (``plugin``) each training BN."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Handle every ``training_mode=1`` BatchNormalization of the main graph."""
        graph = model.graph
        modified = False
        for node in [n for n in graph if is_training_bn(n)]:
            label = self.ctx.node_label(node)
            if self.ctx.fused_norm == "onnx":
                reason = "training-mode BatchNormalization (fused_norm='onnx' keeps it)"
                self.ctx.record([label], "kept", None, reason)
                continue
            result = map_training_bn(graph, node, self.ctx)
            if isinstance(result, str):
                self.ctx.record([label], "kept", None, result)
                continue
            self.ctx.record([label], "fused", *result)
            modified = True
        return ir.passes.PassResult(model, modified)
