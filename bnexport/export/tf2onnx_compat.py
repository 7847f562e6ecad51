"""tf2onnx's optimizer list with its two float32 BN merges switched off for BN nodes.

tf2onnx would merge a BN's ``Mul``/``Add`` into a bias-less ``Conv`` (transpose optimizer)
and fold ``Conv`` + ``BatchNormalization`` (back-to-back optimizer) in float32, losing the
link to the layer. :func:`tf2onnx_optimizers` keeps everything else tf2onnx does.
"""

from __future__ import annotations

import types
from typing import Any

from bnexport.export.patches import BN_NODE_RE


def _keep_bn_transpose_optimizer(protect_all: bool) -> Any:
    """tf2onnx's transpose optimizer class that never merges a BN ``Mul``/``Add`` into a Conv.

    Args:
        protect_all: also protect every ``Mul`` (SavedModels: BNs are not known by name
            there, and any per-channel ``Mul``/``Add`` pair may be one); a lone ``Add``
            (grappler already merged the BN's ``Mul`` into the conv) may still become the
            conv's bias. Otherwise only BN-derived nodes are protected.
    """
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    class KeepBnTransposeOptimizer(TransposeOptimizer):
        """tf2onnx's transpose optimizer; BN ``Mul``/``Add`` are only pushed through.

        Its ``Mul``/``Add`` handlers merge a constant into a bias-less producing ``Conv``
        only when that ``Conv`` has a single consumer; for protected nodes the consumer
        check answers "no", so the generic push-through path runs instead.
        """

        _bn_guard: Any = None

        def _mul_handler(self, trans: Any, node: Any) -> Any:
            return self._guarded(super()._mul_handler, trans, node)

        def _add_handler(self, trans: Any, node: Any) -> Any:
            return self._guarded(super()._add_handler, trans, node)

        def _guarded(self, handler: Any, trans: Any, node: Any) -> Any:
            protected = BN_NODE_RE.search(node.name) or (protect_all and node.type == "Mul")
            if not protected:
                return handler(trans, node)
            self._bn_guard = trans.inputs[0] if trans.inputs else None
            try:
                return handler(trans, node)
            finally:
                self._bn_guard = None

        def _nodes_has_single_consumer_node(self, nodes: Any) -> Any:
            if self._bn_guard is not None and len(nodes) == 1 and nodes[0] is self._bn_guard:
                return False
            return super()._nodes_has_single_consumer_node(nodes)

    return KeepBnTransposeOptimizer


def _keep_bn_back_to_back() -> Any:
    """tf2onnx's back-to-back optimizer without its float32 Conv+BatchNormalization fusion."""
    from tf2onnx.optimizer import back_to_back_optimizer as b2b

    filtered = {k: v for k, v in b2b._func_map.items() if k != ("Conv", "BatchNormalization")}  # noqa: SLF001
    base = b2b.BackToBackOptimizer._optimize_at_current_graph_level  # noqa: SLF001
    patched = types.FunctionType(
        base.__code__, {**base.__globals__, "_func_map": filtered}, base.__name__
    )

    class KeepBnBackToBack(b2b.BackToBackOptimizer):
        """Back-to-back optimizer; BatchNormalization nodes are left to bnexport's pass."""

        _optimize_at_current_graph_level = patched

    return KeepBnBackToBack


def tf2onnx_optimizers(protect_all: bool = False) -> dict[str, Any]:
    """tf2onnx's default optimizer list with both BN merges switched off (see module doc)."""
    from tf2onnx.optimizer import _get_optimizers  # noqa: PLC2701

    optimizers = dict(_get_optimizers())
    optimizers["optimize_transpose"] = _keep_bn_transpose_optimizer(protect_all)
    optimizers["remove_back_to_back"] = _keep_bn_back_to_back()
    return optimizers
