"""State shared by the folding passes of one ``fold_batchnorm`` run.

The first pass (:mod:`patterns`) replaces every foldable normalization by one internal
placeholder node ``bnexport.internal::ChannelAffine(x)`` carrying an :class:`AffineSpec`
in ``node.meta``: the per-channel ``y = x · scale + shift`` in float64. The following
passes fold the placeholder away (forward, backward) or turn it into one real node
(fuse); no placeholder survives the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np
import onnx_ir as ir

from bnexport.export.report import Action, FoldRecord
from bnexport.graph.islands import Float16Policy
from bnexport.graph.utils import Namer

INTERNAL_DOMAIN = "bnexport.internal"
AFFINE_OP = "ChannelAffine"
META_KEY = "bnexport.affine"

FusedNormKind = Literal["onnx", "plugin"]


@dataclasses.dataclass
class AffineSpec:
    """One normalization (BN node and/or constant Mul/Add chain) as ``y = x·scale + shift``.

    Attributes:
        labels: report names (Keras layer names via ``names``, else ONNX node names).
        sources: the ONNX nodes it replaced, in order.
        scale: float64 ``[C]``.
        shift: float64 ``[C]``.
        axis: channel axis counted from the end (negative), e.g. ``-3`` for NCHW.
        rank: rank of ``x``.
        dtype: element type of ``x`` and ``y``.
        refusals: why each fold was refused so far.
        has_bn: it contained a ``BatchNormalization`` node.
    """

    labels: list[str]
    sources: list[str]
    scale: np.ndarray
    shift: np.ndarray
    axis: int
    rank: int
    dtype: ir.DataType
    refusals: list[str] = dataclasses.field(default_factory=list)
    has_bn: bool = False

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.scale.shape[0])

    @property
    def positive_axis(self) -> int:
        """Channel axis counted from the front."""
        return self.rank + self.axis

    def broadcast_shape(self) -> list[int]:
        """Shape ``[C, 1, …]`` that broadcasts ``[C]`` onto the channel axis of ``x``."""
        return [self.channels] + [1] * (-self.axis - 1)


def placeholders(graph: ir.Graph) -> list[ir.Node]:
    """The ``ChannelAffine`` placeholder nodes of ``graph``, in graph order."""
    return [n for n in graph if n.domain == INTERNAL_DOMAIN and n.op_type == AFFINE_OP]


def spec_of(node: ir.Node) -> AffineSpec:
    """The :class:`AffineSpec` of a placeholder node."""
    return node.meta[META_KEY]


@dataclasses.dataclass
class FoldContext:
    """Options and outputs of one folding run, shared by its passes.

    Attributes:
        fused_norm: what an unfoldable normalization becomes (``"onnx"`` or ``"plugin"``).
        names: ONNX node/tensor name -> Keras layer name, for the report.
        float16_policy: what to do when a folded float16 weight does not fit float16.
        records: the report, one :class:`FoldRecord` per normalization.
        shape_error: why shape inference failed on the model, if it did.
    """

    fused_norm: FusedNormKind = "onnx"
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    float16_policy: Float16Policy = "float32"
    records: list[FoldRecord] = dataclasses.field(default_factory=list)
    shape_error: str | None = None
    _namer: Namer | None = None

    def namer(self, graph: ir.Graph) -> Namer:
        """The run's name generator (built from ``graph`` on first use)."""
        if self._namer is None:
            self._namer = Namer(graph)
        return self._namer

    def label(self, node: ir.Node) -> str | None:
        """Report name of ``node``: its mapped layer name, else ``None``."""
        for key in (node.name, *(v.name for v in node.outputs)):
            if key and key in self.names:
                return self.names[key]
        return None

    def node_label(self, node: ir.Node) -> str:
        """Mapped layer name of ``node``, else its node name or first output name."""
        return self.label(node) or node.name or node.outputs[0].name or node.op_type

    def record(
        self, labels: list[str], action: Action, target: str | None, reason: str = ""
    ) -> None:
        """Append one record per label (the same fate for each BN of a merged chain)."""
        for name in labels:
            self.records.append(FoldRecord(name, action, target, reason))


class FoldPass(ir.passes.InPlacePass):
    """A pass of one ``fold_batchnorm`` run; ``ctx`` is the state the run's passes share."""

    def __init__(self, ctx: FoldContext) -> None:
        super().__init__()
        self.ctx = ctx


class FoldRulePass(FoldPass):
    """Apply one fold rule to every placeholder: ``check`` → a plan or a refusal reason.

    Subclasses set ``direction`` (prefix of the recorded refusal), ``action`` (the
    report's verdict when the rule applies) and the rule's ``check``/``rewrite``
    functions; ``reason`` picks what the report says about a successful fold.
    """

    direction: str
    action: Action

    @staticmethod
    def check(ph: ir.Node, spec: AffineSpec) -> object | str:
        """A plan for ``rewrite``, or a string saying why the rule does not apply."""
        raise NotImplementedError

    @staticmethod
    def rewrite(graph: ir.Graph, ph: ir.Node, plan: object, ctx: FoldContext) -> str:
        """Apply ``plan``; return the name of the node the placeholder went into."""
        raise NotImplementedError

    def reason(self, spec: AffineSpec) -> str:
        """What the report says about a successful fold (default: every earlier refusal)."""
        return "; ".join(spec.refusals)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold what the rule allows; remember the reason for the rest."""
        graph = model.graph
        modified = False
        for ph in placeholders(graph):
            spec = spec_of(ph)
            plan = self.check(ph, spec)
            if isinstance(plan, str):
                spec.refusals.append(f"{self.direction}: {plan}")
                continue
            target = self.rewrite(graph, ph, plan, self.ctx)
            self.ctx.record(spec.labels, self.action, target, self.reason(spec))
            modified = True
        return ir.passes.PassResult(model, modified)
