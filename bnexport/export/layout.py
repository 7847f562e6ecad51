"""Move tf2onnx's layout ``Transpose`` in front of a BN's ``Mul``/``Add`` pair.

tf2onnx converts NHWC models by transposing to NCHW around each convolution and then
pushing the transposes *down* the graph. A BN applied to a graph input (or to anything
tf2onnx cannot push a transpose through) therefore ends up as::

    x ─ Mul(scale[C]) ─ Add(shift[C]) ─ Transpose(perm) ─ Conv

where the fold pass cannot see the ``Conv`` behind the ``Transpose``. Because the BN is
per-channel, it commutes with any transpose once its constants are re-laid out::

    Transpose(perm)(x · s + b) = Transpose(perm)(x) · s' + b'

with ``s'``, ``b'`` of shape ``[1, …, C, …, 1]``, ``C`` at ``perm.index(channel_axis)``.
This pass rewrites to ``x ─ Transpose ─ Mul(s') ─ Add(b') ─ Conv`` so the BN can fold
backward (or become one ``BatchNormalization`` with channel axis 1). The ``Add`` keeps
its output name (the tensor of the BN layer), node names are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _const_inputs(node: Any, inits: dict[str, Any]) -> tuple[int, np.ndarray] | None:
    """``(index of the non-constant input, constant array)`` of a binary node, else None."""
    from onnx import numpy_helper

    if len(node.input) != 2:
        return None
    flags = [name in inits for name in node.input]
    if flags.count(True) != 1:
        return None
    const_idx = flags.index(True)
    return 1 - const_idx, numpy_helper.to_array(inits[node.input[const_idx]])


def _channel_vector(array: np.ndarray, rank: int) -> np.ndarray | None:
    """``array`` as ``[C]`` if it broadcasts only along the last axis of a rank-``rank`` tensor."""
    if array.ndim > rank or array.ndim == 0:
        return None
    if any(d != 1 for d in array.shape[:-1]):
        return None
    return array.reshape(-1)


def sink_transposes(model: Any, bn_nodes: Mapping[str, str]) -> int:
    """Rewrite ``Mul``→``Add``→``Transpose`` BN chains in ``model`` (in place).

    Args:
        model: an ``onnx.ModelProto`` from tf2onnx.
        bn_nodes: names of BN-derived nodes (only those are moved).

    Returns:
        The number of chains rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    rewritten = 0
    changed = True
    while changed:
        changed = False
        inits = {i.name: i for i in graph.initializer}
        producers = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        outputs = {o.name for o in graph.output}
        for trans in list(graph.node):
            if trans.op_type != "Transpose" or trans.output[0] in outputs:
                continue
            add = producers.get(trans.input[0])
            if add is None or add.op_type != "Add" or add.name not in bn_nodes:
                continue
            if len(consumers.get(add.output[0], [])) != 1 or add.output[0] in outputs:
                continue
            add_split = _const_inputs(add, inits)
            if add_split is None:
                continue
            mul = producers.get(add.input[add_split[0]])
            if mul is None or mul.op_type != "Mul" or mul.name not in bn_nodes:
                continue
            if len(consumers.get(mul.output[0], [])) != 1 or mul.output[0] in outputs:
                continue
            mul_split = _const_inputs(mul, inits)
            if mul_split is None:
                continue
            perm = next(list(a.ints) for a in trans.attribute if a.name == "perm")
            rank = len(perm)
            scale = _channel_vector(mul_split[1], rank)
            shift = _channel_vector(add_split[1], rank)
            if scale is None or shift is None:
                continue
            shape = [1] * rank
            shape[perm.index(rank - 1)] = scale.size

            x = mul.input[mul_split[0]]
            moved = f"{trans.output[0]}_bnexport_moved"
            new_trans = helper.make_node("Transpose", [x], [moved], name=trans.name, perm=perm)
            s_name, b_name = f"{mul.name}_scale_nc", f"{add.name}_shift_nc"
            graph.initializer.append(
                numpy_helper.from_array(scale.reshape(shape).astype(mul_split[1].dtype), s_name)
            )
            graph.initializer.append(
                numpy_helper.from_array(shift.reshape(shape).astype(add_split[1].dtype), b_name)
            )
            mul.input[:] = [moved, s_name]
            add.input[:] = [mul.output[0], b_name]
            for consumer in consumers.get(trans.output[0], []):
                for i, name in enumerate(consumer.input):
                    if name == trans.output[0]:
                        consumer.input[i] = add.output[0]
            stale = {mul.output[0], add.output[0]}  # their layout changed
            infos = [v for v in graph.value_info if v.name not in stale]
            del graph.value_info[:]
            graph.value_info.extend(infos)
            nodes = [n for n in graph.node if n is not trans]
            nodes.insert(nodes.index(mul), new_trans)
            del graph.node[:]
            graph.node.extend(nodes)
            used = {name for node in graph.node for name in node.input}
            keep = [i for i in graph.initializer if i.name in used]
            del graph.initializer[:]
            graph.initializer.extend(keep)
            rewritten += 1
            changed = True
            break
    return rewritten


def _single(name: str, consumers: dict[str, list[Any]], outputs: set[str]) -> Any:
    """The only consumer of tensor ``name`` (``None`` if several, none, or a graph output)."""
    uses = consumers.get(name, [])
    return uses[0] if len(uses) == 1 and name not in outputs else None


def _static_shapes(model: Any) -> dict[str, list[int | None]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - no shapes: nothing is moved
        return {}
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    return shapes


def sink_reshapes(model: Any, bn_nodes: Mapping[str, str]) -> int:
    """Move a ``Squeeze``/``Reshape`` below the per-channel chain that follows it (in place).

    tf2onnx converts ``Conv1D`` as ``Unsqueeze → Conv → Squeeze`` and ``Dense`` on a
    rank-3 input as ``Reshape → MatMul → Reshape``, so the bias ``Add`` and the BN
    ``Mul``/``Add`` sit behind a shape op where the fold pass cannot reach the linear op.
    A per-channel affine map commutes with such a shape op when the channel axis survives
    it: ``Squeeze`` (constants get the squeezed axes back as size-1 dims) or a ``Reshape``
    that keeps the last dimension, along which every constant varies. The chain
    (``Mul``/``Add`` by constants, single consumers, ending at the last BN-derived node)
    is moved in front of the shape op; the shape op takes over the chain's output name.

    Returns:
        The number of shape ops moved.
    """
    from onnx import numpy_helper

    graph = model.graph
    moved = 0
    shapes: dict[str, list[int | None]] | None = None  # inferred on first need
    changed = True
    while changed:
        changed = False
        inits = {i.name: i for i in graph.initializer}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        outputs = {o.name for o in graph.output}

        for shape_op in list(graph.node):
            if shape_op.op_type not in ("Squeeze", "Reshape"):
                continue
            chain: list[Any] = []
            consts: list[np.ndarray] = []
            node = _single(shape_op.output[0], consumers, outputs)
            while node is not None and node.op_type in ("Mul", "Add"):
                split = _const_inputs(node, inits)
                if split is None:
                    break
                chain.append(node)
                consts.append(split[1])
                node = _single(node.output[0], consumers, outputs)
            last_bn = max((k for k, n in enumerate(chain) if n.name in bn_nodes), default=-1)
            if last_bn < 0:
                continue
            chain, consts = chain[: last_bn + 1], consts[: last_bn + 1]
            if shapes is None:
                shapes = _static_shapes(model)
            src, dst = shapes.get(shape_op.input[0]), shapes.get(shape_op.output[0])
            if src is None or dst is None or not src or not dst:
                continue
            new_consts = _relayout(shape_op, consts, src, dst, inits)
            if new_consts is None:
                continue
            # rewire: x -> chain -> shape_op -> (old consumers of the chain's output)
            x, final = shape_op.input[0], chain[-1].output[0]
            inner = f"{final}_bnexport_presqueeze"
            chain[0].input[list(chain[0].input).index(shape_op.output[0])] = x
            for node, array in zip(chain, new_consts, strict=True):
                const_idx = next(i for i, n in enumerate(node.input) if n in inits)
                name = f"{node.name}_const_relayout"
                graph.initializer.append(numpy_helper.from_array(array, name))
                node.input[const_idx] = name
            chain[-1].output[0] = inner
            shape_op.input[0] = inner
            shape_op.output[0] = final
            stale = {n.output[0] for n in chain} | {final}
            infos = [v for v in graph.value_info if v.name not in stale]
            del graph.value_info[:]
            graph.value_info.extend(infos)
            nodes = [n for n in graph.node if n is not shape_op]
            nodes.insert(nodes.index(chain[-1]) + 1, shape_op)
            del graph.node[:]
            graph.node.extend(nodes)
            used = {name for n in graph.node for name in n.input}
            keep = [i for i in graph.initializer if i.name in used]
            del graph.initializer[:]
            graph.initializer.extend(keep)
            moved += 1
            changed = True
            shapes = None
            break
    return moved


def _relayout(
    shape_op: Any,
    consts: list[np.ndarray],
    src: list[int | None],
    dst: list[int | None],
    inits: dict[str, Any],
) -> list[np.ndarray] | None:
    """Constants re-laid out for ``shape_op``'s input, or ``None`` if they don't commute."""
    from onnx import numpy_helper

    channels = dst[-1]
    if channels is None:
        return None
    if shape_op.op_type == "Reshape":
        if src[-1] != channels:
            return None
        if any(c.ndim > 1 and any(d != 1 for d in c.shape[:-1]) for c in consts):
            return None  # only last-axis vectors (or scalars) commute with a reshape
        return [c.reshape(-1) if c.ndim else c for c in consts]
    # Squeeze: axes from the second input (opset >= 13) or the attribute
    axes: list[int] | None = None
    if len(shape_op.input) > 1 and shape_op.input[1] in inits:
        axes = [int(a) for a in numpy_helper.to_array(inits[shape_op.input[1]]).reshape(-1)]
    else:
        axes = next((list(a.ints) for a in shape_op.attribute if a.name == "axes"), None)
    if axes is None:
        return None
    rank_in = len(src)
    axes = sorted(a % rank_in for a in axes)
    out = []
    for c in consts:
        if c.ndim > len(dst):
            return None
        full = c.reshape((1,) * (len(dst) - c.ndim) + c.shape)
        for axis in axes:
            full = np.expand_dims(full, axis)
        out.append(full)
    return out
