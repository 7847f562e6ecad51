"""tf2onnx's optimizer list with its two float32 BN merges switched off for BN nodes.

tf2onnx would merge a BN's ``Mul``/``Add`` into a bias-less ``Conv`` (transpose optimizer)
and fold ``Conv`` + ``BatchNormalization`` (back-to-back optimizer) in float32, losing the
link to the layer. :func:`tf2onnx_optimizers` keeps everything else tf2onnx does, and
guards the transpose optimizer's ``Add`` handler against 0-d constants (a tf2onnx bug
that stock tf2onnx hides by undoing the optimizer; the export runs with
``TF2ONNX_CATCH_ERRORS=FALSE`` so that any other optimizer failure stays loud).
"""

from __future__ import annotations

import types
from typing import Any

from bnexport.export.patches import BN_NODE_RE


def _scalar_const(node: Any) -> bool:
    """Whether ``node``'s second input is a 0-d constant (hard-sigmoid's ``x + 3``).

    tf2onnx 1.17's ``_add_handler`` computes ``max(value.shape)`` to merge the constant
    into a bias-less ``Conv``; for a 0-d value that raises ``ValueError: max() arg is an
    empty sequence`` (MobileNetV3). Such an ``Add`` is pushed through the transpose
    instead, which is what tf2onnx does with any constant it cannot merge.
    """
    inputs = getattr(node, "inputs", None) or []
    if len(inputs) < 2 or inputs[1] is None or not inputs[1].is_const():
        return False
    return inputs[1].get_tensor_value(as_list=False).ndim == 0


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
            protected = (
                BN_NODE_RE.search(node.name)
                or (protect_all and node.type == "Mul")
                or (node.type == "Add" and _scalar_const(node))
            )
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

        # The two methods below are tf2onnx 1.17's, with the same effect and less work:
        # it rescans every node after each change (O(changes × nodes) calls of three
        # helpers) and re-sorts the graph after each constant Reshape it folds.

        def pre_optimize_action(self) -> None:
            """Fold ``Reshape(const, const)`` into a constant; sort once, not per Reshape."""
            import numpy as np

            graph = self._g
            self._output_names = [graph.get_node_by_output(out).name for out in graph.outputs]
            ops = self.nodes
            constable = [
                n
                for n in ops
                if n.type == "Reshape" and n.inputs[0].is_const() and n.inputs[1].is_const()
            ]
            for reshape_op in constable:
                target_t = reshape_op.inputs[0].get_tensor_value(as_list=False)
                target_shape = reshape_op.inputs[1].get_tensor_value(as_list=True)
                for i, dim in enumerate(target_shape):
                    if dim == 0:  # in ONNX a 0 keeps the dimension
                        target_shape[i] = target_t.shape[i]
                const_name = reshape_op.output[0]
                graph.remove_node(reshape_op.name)
                graph.make_const(const_name, np.reshape(target_t, target_shape))
                for output_name in reshape_op.output:
                    for child in ops:
                        for i, name in enumerate(child.input):
                            if name == output_name:
                                child.input[i] = const_name
            if constable:
                graph.topological_sort(graph.get_nodes())

        def _optimize_at_current_graph_level(self, graph: Any) -> Any:
            """tf2onnx's loop; non-``Transpose`` nodes are skipped with one type check.

            The live node list is walked by index exactly as ``for n in nodes`` would
            (nodes appended or removed by a handler are seen or skipped alike); every
            other line is tf2onnx's.
            """
            self._g = graph
            self.pre_optimize_action()
            no_action = False
            while not no_action:
                no_action = True
                nodes = self.nodes
                self._force_stop = {}
                i = 0
                while i < len(nodes):
                    n = nodes[i]
                    i += 1
                    if n.type != "Transpose":
                        continue
                    if n.get_attr("perm") and self._handle_nhwc_tranpose(n):
                        no_action = False
                        self.graph_been_opt = True
                        break
                    if graph.get_node_by_name(n.name) is not None and _useless(n):
                        no_action = False
                        self._remove_useless_tranpose(n)
                        break
                if self._force_stop.get("stop") == 1:
                    break
            self.merge_duplicated_transposes()
            self.post_optimize_action()
            return self._g

    return KeepBnTransposeOptimizer


def _useless(node: Any) -> bool:
    """tf2onnx's ``is_useless_transpose``: a ``Transpose`` with the identity ``perm``."""
    perm = node.get_attr("perm")
    return bool(perm) and list(perm.ints) == list(range(len(perm.ints)))


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


def _without_proto_sync(cls: Any) -> Any:
    """``cls`` whose ``optimize`` does not rewrite every node's protobuf afterwards.

    tf2onnx's ``GraphOptimizerBase.optimize`` ends with ``graph.update_proto()``, which
    re-copies every node's attributes (all weight tensors) into its ``NodeProto``; with
    twelve optimizers run twice that is the largest single cost of a conversion (a third
    of it on ResNet50). The optimizers work on tf2onnx's Python ``Node`` objects, never on
    the protobuf, and ``Graph.make_graph`` syncs the protobuf once at the end, so the sync
    in between changes nothing but the time. Likewise the dead-node sweep after an
    optimizer that reported no change (``graph_been_opt`` false, the flag tf2onnx's own
    loop relies on to stop) is skipped.
    """

    class NoProtoSync(cls):
        def optimize(self, graph: Any, iteration: int) -> Any:
            self.opt_iteration = iteration
            graph = self._optimize(graph)
            if self.graph_been_opt:  # an optimizer that changed nothing left nothing unused
                graph.delete_unused_nodes(graph.outputs)
            return graph

    NoProtoSync.__name__ = cls.__name__
    NoProtoSync.__qualname__ = cls.__qualname__
    return NoProtoSync


def tf2onnx_optimizers(protect_all: bool = False) -> dict[str, Any]:
    """tf2onnx's default optimizer list with both BN merges switched off (see module doc).

    Every optimizer runs as in tf2onnx, minus the protobuf sync after each one
    (:func:`_without_proto_sync`).
    """
    from tf2onnx.optimizer import _get_optimizers  # noqa: PLC2701

    optimizers = dict(_get_optimizers())
    optimizers["optimize_transpose"] = _keep_bn_transpose_optimizer(protect_all)
    optimizers["remove_back_to_back"] = _keep_bn_back_to_back()
    return {name: _without_proto_sync(cls) for name, cls in optimizers.items()}
