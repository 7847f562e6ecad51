"""Write ONNX nodes and initializers through onnx-ir, with unique names and layout changes.

Every node gets a name ``<layer>/<op>`` (made unique), so a checker error or a float16
overflow names the Keras layer it came from (:attr:`Builder.node_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bnexport.export.emitter.values import Tensor, identity

_NP_TO_IR = {
    np.dtype("float32"): ir.DataType.FLOAT,
    np.dtype("float16"): ir.DataType.FLOAT16,
    np.dtype("float64"): ir.DataType.DOUBLE,
    np.dtype("int64"): ir.DataType.INT64,
    np.dtype("int32"): ir.DataType.INT32,
    np.dtype("bool"): ir.DataType.BOOL,
}


def ir_dtype(name: str) -> ir.DataType:
    """The ONNX element type of a Keras dtype name."""
    try:
        return _NP_TO_IR[np.dtype(name)]
    except (KeyError, TypeError) as exc:
        raise KeyError(name) from exc


class Builder:
    """One ONNX graph under construction.

    Args:
        opset: the default-domain opset the nodes are written for.
        name: the graph name.
    """

    def __init__(self, opset: int, name: str = "model") -> None:
        self.opset = opset
        self.graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": opset}, name=name)
        self._names: set[str] = set()
        self._node_names: set[str] = set()
        self._layouts: dict[tuple[int, tuple[int, ...]], ir.Value] = {}
        self._seen: dict[tuple, Any] = {}
        self.layer = "model"  # the Keras layer being converted, prefix of node names
        #: ``{node name: Keras layer}`` of every node written
        self.node_layers: dict[str, str] = {}

    # -- names ---------------------------------------------------------------------------
    def fresh(self, base: str, *, node: bool = False) -> str:
        """A value (or ``node``) name not used yet in this graph (``base``, ``base_1``, ...)."""
        used = self._node_names if node else self._names
        name, k = base, 1
        while name in used:
            name = f"{base}_{k}"
            k += 1
        used.add(name)
        return name

    def claim(self, name: str) -> None:
        """Reserve ``name`` (a graph input or output name) so nothing else takes it."""
        self._names.add(name)

    # -- initializers and nodes ------------------------------------------------------------
    def const(self, array: Any, base: str = "const", dtype: Any = None) -> ir.Value:
        """An initializer holding ``array`` (cast to ``dtype`` when given)."""
        arr = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
        name = self.fresh(f"{self.layer}/{base}")
        value = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
        value.shape = ir.Shape(arr.shape)
        value.dtype = _NP_TO_IR[arr.dtype]
        self.graph.register_initializer(value)
        return value

    def ints(self, values: Sequence[int], base: str = "ints") -> ir.Value:
        """An int64 1-D initializer (shapes, pads, axes)."""
        return self.const(np.asarray(list(values), np.int64), base)

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        *,
        num_outputs: int = 1,
        domain: str = "",
    ) -> ir.Value | list[ir.Value]:
        """Append one node; its output (or outputs when ``num_outputs > 1``).

        The same op on the same values with the same attributes is written once (Keras
        graphs often apply one activation or pooling to a tensor in several branches):
        the earlier output is returned.
        """
        key = (
            domain,
            op_type,
            tuple(id(v) if v is not None else None for v in inputs),
            repr(sorted((attributes or {}).items())),
            num_outputs,
        )
        if key in self._seen:
            return self._seen[key]
        name = self.fresh(f"{self.layer}/{op_type}", node=True)
        outputs = [
            ir.Value(name=self.fresh(name if i == 0 else f"{name}:{i}")) for i in range(num_outputs)
        ]
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=[_attr(k, v) for k, v in (attributes or {}).items()],
            outputs=outputs,
            name=name,
        )
        self.graph.append(node)
        self.node_layers[name] = self.layer
        result = outputs if num_outputs > 1 else outputs[0]
        self._seen[key] = result
        return result

    # -- layouts ---------------------------------------------------------------------------
    def in_layout(self, tensor: Tensor, perm: Sequence[int]) -> ir.Value:
        """``tensor``'s value stored as ``keras_tensor.transpose(perm)`` (Transpose cached)."""
        perm = tuple(perm)
        if perm == tensor.perm:
            return tensor.value
        key = (id(tensor.value), perm)
        if key not in self._layouts:
            # value = k.T(p); want k.T(q) = value.T(r) with p[r[i]] = q[i]
            r = [tensor.perm.index(q) for q in perm]
            self._layouts[key] = self.op("Transpose", [tensor.value], {"perm": r})  # type: ignore[assignment]
        return self._layouts[key]

    def keras_layout(self, tensor: Tensor) -> ir.Value:
        """``tensor``'s value in Keras's own layout."""
        return self.in_layout(tensor, identity(tensor.rank))

    def broadcast_const(self, array: Any, perm: Sequence[int], rank: int, base: str) -> ir.Value:
        """A constant that broadcasts (Keras rules) against a rank-``rank`` tensor in ``perm``.

        Keras right-aligns ``array`` against the tensor; stored in layout ``perm``, the
        constant is first padded to ``rank`` axes, then transposed like the tensor.
        """
        arr = np.asarray(array)
        if arr.ndim > rank:
            raise ValueError(f"constant of rank {arr.ndim} against a rank-{rank} tensor")
        if arr.ndim and tuple(perm) != identity(rank):
            arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape).transpose(perm)
            while arr.ndim > 1 and arr.shape[0] == 1:  # keep it small: drop leading 1s
                arr = arr[0]
        return self.const(arr, base)

    def channel_const(self, vector: np.ndarray, axis: int, rank: int, base: str) -> ir.Value:
        """A ``[C]`` vector shaped to broadcast along ONNX ``axis`` of a rank-``rank`` value."""
        shape = [1] * (rank - axis)
        shape[0] = -1
        return self.const(np.asarray(vector).reshape(shape), base)


def _attr(name: str, value: Any) -> ir.Attr:
    if isinstance(value, bool):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, int | np.integer):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float | np.floating):
        return ir.AttrFloat32(name, float(value))
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, list | tuple):
        if all(isinstance(v, int | np.integer) for v in value):
            return ir.AttrInt64s(name, [int(v) for v in value])
        return ir.AttrFloat32s(name, [float(v) for v in value])
    raise TypeError(f"attribute {name}: unsupported value {value!r}")
