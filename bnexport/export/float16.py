"""Convert a folded float32 ONNX graph to float16 (onnx-ir), never producing a silent inf.

Order matters: BNs are folded in float64 and cast to float32 first, *then* every float32
tensor (weights, activations, ``Cast(to=float)``, ``Constant``/``ConstantOfShape``
values) becomes float16. A node with a float32 constant input whose largest finite
magnitude exceeds float16's 65504 would get ``inf`` weights; by policy it either stays in
float32 (``"float32"``: its float inputs are cast up, its outputs cast back down, names
kept) or the export fails naming the layer (``"error"``).

Slots whose type the ONNX spec (or the FusedNorm plugin) fixes to float32 stay float32:
``Resize`` scales and roi, ``FusedNorm`` scale/shift.

Graph inputs and outputs become float16 too (what TensorRT engines usually take) unless
``io_dtype="float32"``, in which case a ``Cast`` follows each float input and precedes each
float output, so callers keep feeding float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from bnexport_plugins.fused_norm import spec as fused_norm_spec

from bnexport.errors import ExportError

FLOAT16_MAX = 65504.0
OverflowPolicy = Literal["float32", "error"]

#: (op_type, input index) of default-domain ops that must stay float32
_FLOAT32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _float32_slot(node: Any, idx: int) -> bool:
    """Input ``idx`` of ``node`` must stay float32 (ONNX spec, or FusedNorm's scale/shift)."""
    if fused_norm_spec.is_fused_norm(node):
        return idx in fused_norm_spec.FLOAT32_INPUTS
    return (node.op_type, idx) in _FLOAT32_SLOTS


def _overflows(array: np.ndarray) -> bool:
    finite = array[np.isfinite(array)]
    return bool(finite.size) and float(np.max(np.abs(finite))) > FLOAT16_MAX


def _to_fp16_tensor(ir: Any, tensor: Any, name: str | None) -> Any:
    return ir.tensor(np.asarray(tensor.numpy()).astype(np.float16), name=name)


def convert_to_float16(
    model: Any,
    *,
    io_dtype: Literal["float16", "float32"] = "float16",
    on_overflow: OverflowPolicy = "float32",
    labels: Mapping[str, str] | None = None,
) -> tuple[Any, list[str]]:
    """Return ``(float16 ModelProto, names of nodes kept in float32)``.

    Args:
        model: a float32 ``onnx.ModelProto`` (not modified).
        io_dtype: dtype of the float graph inputs/outputs in the result.
        on_overflow: ``"float32"`` keeps an overflowing node in float32, ``"error"`` raises.
        labels: ``{onnx node name: layer name}`` used to name the layer in errors/reports.

    Raises:
        ExportError: ``on_overflow="error"`` and a weight overflows float16 (names the layer).
    """
    import onnx
    import onnx_ir as ir

    labels = dict(labels or {})
    FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph_model = ir.serde.deserialize_model(inferred)
    graph = graph_model.graph

    # 1. nodes whose float32 constants would overflow float16
    keep32: list[Any] = []
    for node in graph:
        for value in node.inputs:
            if value is None or value.const_value is None or value.dtype != FLOAT:
                continue
            if _overflows(np.asarray(value.const_value.numpy())):
                label = labels.get(node.name or "", node.name)
                if on_overflow == "error":
                    raise ExportError(
                        f"{label}: folded weight {value.name!r} of node {node.name!r} exceeds "
                        f"float16's range (max |w| > {FLOAT16_MAX:g}); use "
                        "keep_float16_overflow='float32' to keep this op in float32"
                    )
                keep32.append(node)
                break
    keep_ids = {id(n) for n in keep32}

    # 2. which float32 values must stay float32: inputs/outputs of kept nodes, fixed slots
    stay32: set[int] = set()
    for node in graph:
        for i, value in enumerate(node.inputs):
            if value is not None and _float32_slot(node, i):
                if value.const_value is not None or value.is_graph_input():
                    stay32.add(id(value))
    for node in keep32:
        stay32.update(id(v) for v in node.outputs)
        stay32.update(id(v) for v in node.inputs if v is not None and v.const_value is not None)

    # 3. initializers: float16 copies where any float16 consumer needs them
    for name, value in list(graph.initializers.items()):
        if value.dtype != FLOAT or value.const_value is None:
            continue
        uses = list(value.uses())
        needs32 = [u for u in uses if id(u.node) in keep_ids or _float32_slot(u.node, u.idx)]
        if len(needs32) == len(uses) and uses:
            continue
        if needs32:  # shared: give the float16 consumers their own copy
            half = ir.Value(name=f"{name}_fp16", type=ir.TensorType(HALF), shape=value.shape)
            half.const_value = _to_fp16_tensor(ir, value.const_value, half.name)
            graph.register_initializer(half)
            for use in uses:
                if use not in needs32:
                    use.node.replace_input_with(use.idx, half)
            continue
        value.const_value = _to_fp16_tensor(ir, value.const_value, name)
        value.type = ir.TensorType(HALF)

    # 4. every other float32 value, attribute and Cast target
    for node in graph:
        if id(node) in keep_ids:
            continue
        if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT.value:
            node.attributes["to"] = ir.AttrInt64("to", HALF.value)
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype == FLOAT:
                node.attributes["value"] = ir.AttrTensor("value", _to_fp16_tensor(ir, tensor, None))
        for value in node.outputs:
            if value.dtype == FLOAT and id(value) not in stay32:
                value.type = ir.TensorType(HALF)
    for value in graph.inputs:
        if value.dtype == FLOAT and id(value) not in stay32:
            value.type = ir.TensorType(HALF)

    # 5. float32 islands: cast float16 inputs up, outputs back down (names kept)
    for node in keep32:
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype != HALF:
                continue
            cast = ir.node("Cast", [value], {"to": FLOAT.value}, name=f"{node.name}_cast_in{i}")
            cast.outputs[0].name = f"{value.name}_fp32_for_{node.name}"
            cast.outputs[0].type = ir.TensorType(FLOAT)
            cast.outputs[0].shape = value.shape
            graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])
        for j, out in enumerate(node.outputs):
            if out.dtype != FLOAT or not (out.uses() or out.is_graph_output()):
                continue
            name = out.name
            cast = ir.node("Cast", [out], {"to": HALF.value}, name=f"{node.name}_cast_out{j}")
            graph.insert_after(node, cast)
            down = cast.outputs[0]
            down.type = ir.TensorType(HALF)
            down.shape = out.shape
            out.replace_all_uses_with(down, replace_graph_outputs=True)
            cast.replace_input_with(0, out)
            out.name = f"{name}_fp32"
            down.name = name

    # 6. float32 graph IO on request
    if io_dtype == "float32":
        _float32_io(ir, graph, FLOAT, HALF)

    result = ir.serde.serialize_model(graph_model)
    del result.graph.value_info[:]  # stale float32 annotations; shape inference redoes them
    return result, [n.name for n in keep32]


def _float32_io(ir: Any, graph: Any, FLOAT: Any, HALF: Any) -> None:  # noqa: N803
    for k, value in enumerate(list(graph.inputs)):
        if value.dtype != HALF:
            continue
        name = value.name
        new_input = ir.Value(name=name, type=ir.TensorType(FLOAT), shape=value.shape)
        value.name = f"{name}_fp16"
        cast = ir.node("Cast", [new_input], {"to": HALF.value}, name=f"{name}_to_fp16")
        graph.insert_before(graph.node(0), cast)
        value.replace_all_uses_with(cast.outputs[0])
        cast.outputs[0].name = f"{name}_fp16"
        cast.outputs[0].type = ir.TensorType(HALF)
        cast.outputs[0].shape = value.shape
        graph.inputs[k] = new_input
    for k, value in enumerate(list(graph.outputs)):
        if value.dtype != HALF:
            continue
        name = value.name
        value.name = f"{name}_fp16"
        cast = ir.node("Cast", [value], {"to": FLOAT.value}, name=f"{name}_to_fp32")
        graph.append(cast)
        out = cast.outputs[0]
        out.name = name
        out.type = ir.TensorType(FLOAT)
        out.shape = value.shape
        graph.outputs[k] = out
