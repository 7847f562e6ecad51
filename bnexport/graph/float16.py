"""Convert a folded float32 ONNX graph to float16 (onnx-ir), never producing a silent inf.

Order matters: BNs are folded in float64 and cast to float32 first, *then* every float32
tensor (weights, activations, ``Cast(to=float)``, ``Constant``/``ConstantOfShape``
values) becomes float16. A node with a float32 constant input whose largest finite
magnitude exceeds float16's 65504 would get ``inf`` weights; by policy it either stays in
float32 (``"float32"``: a float32 island, see :mod:`bnexport.graph.islands` —
its float inputs are cast up, its outputs cast back down, names kept) or the export
fails naming the layer (``"error"``).

Slots whose type the ONNX spec (or the FusedNorm plugin) fixes to float32 stay float32:
``Resize`` scales and roi, ``FusedNorm`` scale/shift.

Graph inputs and outputs become float16 too (what TensorRT engines usually take) unless
``io_dtype="float32"``, in which case a ``Cast`` follows each float input and precedes each
float output, so callers keep feeding float32.

The islands need the type of every input of a kept node, so shape inference runs first
(:mod:`bnexport.graph.shapes`); an input it leaves untyped is an
:class:`~bnexport.errors.ExportError` that names the node and the inference error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from bnexport_plugins.fused_norm import spec as fused_norm_spec

from bnexport.errors import ExportError
from bnexport.graph.islands import (
    FLOAT16_MAX,
    Float16Policy,
    overflows_float16,
    run_in_float32,
)
from bnexport.graph.shapes import infer_shapes
from bnexport.graph.utils import Namer, append_to

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
IODtype = Literal["float16", "float32"]

#: (op_type, input index) of default-domain ops that must stay float32
_FLOAT32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _float32_slot(node: ir.Node, idx: int) -> bool:
    """Input ``idx`` of ``node`` must stay float32 (ONNX spec, or FusedNorm's scale/shift)."""
    if fused_norm_spec.is_fused_norm(node):
        return idx in fused_norm_spec.FLOAT32_INPUTS
    return (node.op_type, idx) in _FLOAT32_SLOTS


def _to_float16(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy()).astype(np.float16), name=name)


def _float_constants(node: ir.Node) -> Iterable[ir.Value]:
    """The float32 constant (initializer) inputs of ``node``."""
    for value in node.inputs:
        if value is not None and value.const_value is not None and value.dtype == FLOAT:
            yield value


def overflowing_nodes(
    graph: ir.Graph, on_overflow: Float16Policy, labels: Mapping[str, str]
) -> list[ir.Node]:
    """Nodes with a float32 constant input that does not fit float16.

    Raises:
        ExportError: ``on_overflow="error"`` and such a node exists (names the layer).
    """
    kept = []
    for node in graph:
        value = next(
            (v for v in _float_constants(node) if overflows_float16(v.const_value.numpy())), None
        )
        if value is None:
            continue
        if on_overflow == "error":
            label = labels.get(node.name or "", node.name)
            raise ExportError(
                f"{label}: folded weight {value.name!r} of node {node.name!r} exceeds "
                f"float16's range (max |w| > {FLOAT16_MAX:g}); use "
                "keep_float16_overflow='float32' to keep this op in float32"
            )
        kept.append(node)
    return kept


def values_kept_float32(graph: ir.Graph, keep32: Iterable[ir.Node]) -> set[ir.Value]:
    """Values that stay float32: fixed float32 slots, and the outputs/constants of ``keep32``."""
    stay = {
        value
        for node in graph
        for i, value in enumerate(node.inputs)
        if value is not None
        and _float32_slot(node, i)
        and (value.const_value is not None or value.is_graph_input())
    }
    for node in keep32:
        stay.update(node.outputs)
        stay.update(v for v in node.inputs if v is not None and v.const_value is not None)
    return stay


def convert_initializers(graph: ir.Graph, keep32: set[ir.Node]) -> None:
    """Float32 initializers become float16, but for the readers that need float32.

    An initializer read only by nodes that need float32 (``keep32``, fixed slots) stays;
    one read by both kinds keeps its float32 value and gets a float16 copy
    (``<name>_fp16``) for the other readers.
    """
    namer = Namer(graph)
    for name, value in list(graph.initializers.items()):
        if value.dtype != FLOAT or value.const_value is None:
            continue
        uses = list(value.uses())
        needs32 = [u for u in uses if u.node in keep32 or _float32_slot(u.node, u.idx)]
        if uses and len(needs32) == len(uses):
            continue
        if not needs32:
            value.const_value = _to_float16(value.const_value, name)
            value.type = ir.TensorType(HALF)
            continue
        half = ir.Value(name=namer.fresh(f"{name}_fp16"), type=ir.TensorType(HALF))
        half.shape = value.shape
        half.const_value = _to_float16(value.const_value, half.name)
        graph.register_initializer(half)
        for use in uses:
            if use not in needs32:
                use.node.replace_input_with(use.idx, half)


def _convert_attributes(node: ir.Node) -> None:
    """``Cast(to=float)`` → float16; float ``Constant``/``ConstantOfShape`` values → float16."""
    if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT.value:
        node.attributes["to"] = ir.AttrInt64("to", HALF.value)
    if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
        if tensor.dtype == FLOAT:
            node.attributes["value"] = ir.AttrTensor("value", _to_float16(tensor, None))


def convert_values(graph: ir.Graph, keep32: set[ir.Node], stay32: set[ir.Value]) -> None:
    """Every other float32 value, attribute and ``Cast`` target becomes float16."""
    for node in graph:
        if node in keep32:
            continue
        _convert_attributes(node)
        for value in node.outputs:
            if value.dtype == FLOAT and value not in stay32:
                value.type = ir.TensorType(HALF)
    for value in graph.inputs:
        if value.dtype == FLOAT and value not in stay32:
            value.type = ir.TensorType(HALF)


def _check_typed_inputs(node: ir.Node, shape_error: str | None, label: str) -> None:
    """An island casts its float16 inputs up: each input's type must be known."""
    for value in node.inputs:
        if value is not None and value.const_value is None and value.dtype is None:
            why = f" (shape inference failed: {shape_error})" if shape_error else ""
            raise ExportError(
                f"{label}: node {node.name!r} must run in float32 but the type of its input "
                f"{value.name!r} is unknown{why}"
            )


def float32_io(graph: ir.Graph, namer: Namer) -> None:
    """Float16 graph inputs/outputs become float32 ones with a ``Cast`` inside (names kept)."""
    first = graph.node(0) if len(graph) else None
    for k, value in enumerate(list(graph.inputs)):
        if value.dtype != HALF:
            continue
        name = value.name
        new_input = ir.Value(name=name, type=ir.TensorType(FLOAT), shape=value.shape)
        value.name = namer.fresh(f"{name}_fp16")
        cast = ir.node("Cast", [new_input], {"to": HALF}, name=namer.fresh(f"{name}_to_fp16"))
        if first is None:
            graph.append(cast)
        else:
            graph.insert_before(first, cast)
        value.replace_all_uses_with(cast.outputs[0], replace_graph_outputs=True)
        cast.outputs[0].name = value.name
        cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(HALF), value.shape
        graph.inputs[k] = new_input
    for value in list(graph.outputs):
        if value.dtype != HALF:
            continue
        cast = ir.node("Cast", [value], {"to": FLOAT}, name=namer.fresh(f"{value.name}_to_fp32"))
        out = append_to(graph, namer, value, cast, suffix="fp16", outputs_only=True)
        out.type = ir.TensorType(FLOAT)


class Float16ConversionPass(ir.passes.InPlacePass):
    """Convert a float32 graph to float16 in place; ``float32_nodes`` names the islands."""

    def __init__(
        self,
        *,
        io_dtype: IODtype = "float16",
        on_overflow: Float16Policy = "float32",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.io_dtype = io_dtype
        self.on_overflow = on_overflow
        self.labels = dict(labels or {})
        self.float32_nodes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Shape inference, then float32 islands, float16 everything else, float IO."""
        shape_error = infer_shapes(model)
        graph = model.graph
        keep32 = overflowing_nodes(graph, self.on_overflow, self.labels)
        for node in keep32:
            _check_typed_inputs(node, shape_error, self.labels.get(node.name or "", node.name))
        stay32 = values_kept_float32(graph, keep32)
        convert_initializers(graph, set(keep32))
        convert_values(graph, set(keep32), stay32)
        namer = Namer(graph)
        for node in keep32:
            run_in_float32(graph, namer, [node], HALF)
        if self.io_dtype == "float32":
            float32_io(graph, namer)
        self.float32_nodes = [node.name or "" for node in keep32]
        return ir.passes.PassResult(model, True)


def convert_to_float16(
    model: onnx.ModelProto,
    *,
    io_dtype: IODtype = "float16",
    on_overflow: Float16Policy = "float32",
    labels: Mapping[str, str] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """Return ``(float16 ModelProto, names of nodes kept in float32)``.

    Args:
        model: a float32 ``onnx.ModelProto`` (not modified).
        io_dtype: dtype of the float graph inputs/outputs in the result.
        on_overflow: ``"float32"`` keeps an overflowing node in float32, ``"error"`` raises.
        labels: ``{onnx node name: layer name}`` used to name the layer in errors/reports.

    Raises:
        ExportError: ``on_overflow="error"`` and a weight overflows float16 (names the layer),
            or a node that must stay float32 has an input of unknown type.
    """
    ir_model = ir.serde.deserialize_model(model)
    conversion = Float16ConversionPass(io_dtype=io_dtype, on_overflow=on_overflow, labels=labels)
    conversion(ir_model)
    result = ir.serde.serialize_model(ir_model)
    del result.graph.value_info[:]  # stale float32 annotations; shape inference redoes them
    return result, conversion.float32_nodes
