"""The Keras-native ONNX emitter: a Keras 3 functional model straight to ONNX (onnx-ir).

No TensorFlow graph, no tf2onnx: :mod:`.walk` follows Keras's own functional graph and a
converter per layer class (:mod:`.registry`; conv, normalization, activations, merge,
pooling, reshape, preprocessing modules) writes ONNX nodes through :mod:`.builder`.
Image tensors are stored NCHW inside the graph, with one ``Transpose`` where a Keras-layout
tensor meets a channels-first op and at each NHWC output (:mod:`.values`). Batch
normalization folds into the preceding convolution as it is emitted; what cannot fold
then goes through the usual fold passes (:mod:`bnexport.export.passes`).

A model the emitter cannot express (an unknown layer or op, a subclassed model) raises
:class:`UnsupportedLayer` naming the layer; ``bnexport.export(engine="auto")`` then
exports the whole model through tf2onnx instead (on TensorFlow's backend only).

Nothing here imports TensorFlow: it works on every Keras 3 backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from bnexport.export.emitter import (  # noqa: F401 - registers the converters
    activations,
    convert_conv,
    convert_merge,
    convert_norm,
    convert_pooling,
    convert_preprocessing,
    convert_reshape,
)
from bnexport.export.emitter.builder import Builder, ir_dtype
from bnexport.export.emitter.registry import EmitContext, UnsupportedLayer
from bnexport.export.emitter.values import Tensor, identity, inverse
from bnexport.export.emitter.walk import consumer_counts, function_of, run_function
from bnexport.export.report import FoldRecord

__all__ = ["EmitResult", "UnsupportedLayer", "emit_model", "layer_outputs"]

#: name of the dynamic batch dimension (the same on both engines)
BATCH_DIM = "batch"


@dataclasses.dataclass
class EmitResult:
    """What the emitter wrote.

    Attributes:
        model: the ``onnx_ir.Model`` (BNs folded at emission, the rest as ``Mul``/``Add``);
            the fold passes run on it in place, and it is serialized once, after them.
        records: the BNs folded at emission (``folded_forward``).
        bn_nodes: ``{onnx node: BN layer}`` of the BNs left to the fold passes.
        layer_tensors: ``{layer: onnx tensor}`` carrying each layer's output.
        layer_perms: ``{layer: perm}``: ``keras_output = onnx_tensor.transpose(perm)``.
        node_layers: ``{onnx node: layer}`` of every node written.
    """

    model: Any
    records: list[FoldRecord]
    bn_nodes: dict[str, str]
    layer_tensors: dict[str, str]
    layer_perms: dict[str, list[int]]
    node_layers: dict[str, str]


def _dims(
    shape: list[int | None], dynamic_batch: bool, batch: int | None, name: str
) -> list[int | ir.SymbolicDim]:
    dims: list[int | ir.SymbolicDim] = []
    for i, d in enumerate(shape):
        if i == 0:
            dims.append(ir.SymbolicDim(BATCH_DIM) if dynamic_batch else int(batch or d or 1))
        elif d is None:
            dims.append(ir.SymbolicDim(f"{name}_dim{i}"))
        else:
            dims.append(int(d))
    return dims


def emit_model(
    loaded: Any,
    bns: list[Any],
    *,
    opset: int,
    dynamic_batch: bool = True,
    input_shapes: dict[str, Any] | None = None,
) -> EmitResult:
    """Emit ``loaded`` (a :class:`~bnexport.export.loaders.LoadedModel` of a Keras 3 model).

    Args:
        loaded: the model and its input/output names (the same names tf2onnx gets).
        bns: its BN layers (:func:`bnexport.export.bn_layers.find_bn_layers`).
        opset: ONNX default-domain opset (13–21).
        dynamic_batch: a symbolic ``batch`` dimension; else the model's batch size (or 1).
        input_shapes: ``{input: shape}`` overriding the model's input shapes (a static
            batch among them is kept when ``dynamic_batch`` is False).

    Raises:
        UnsupportedLayer: a layer or op without converter, or a model without a functional
            graph (the message names it).
    """
    from bnexport.layers.walk import display_names

    model = loaded.model
    if loaded.kind != "keras":
        raise UnsupportedLayer(getattr(model, "name", "model"), f"a {loaded.kind} model")
    function = function_of(model)
    if function is None:
        raise UnsupportedLayer(model.name, "a subclassed model has no functional graph")
    b = Builder(opset, name=model.name)
    for info in [*loaded.inputs, *loaded.outputs]:
        b.claim(info.name)
    ctx = EmitContext(b=b, bns={id(bn.layer): bn for bn in bns}, names=display_names(model))
    counts = consumer_counts(function)
    inputs: list[Tensor] = []
    overrides = dict(input_shapes or {})
    for info, kt in zip(loaded.inputs, function.inputs, strict=True):
        shape = list(overrides.get(info.name, info.shape))
        try:
            dtype = ir_dtype(info.dtype)
        except KeyError:
            raise UnsupportedLayer(info.name, f"input of dtype {info.dtype}") from None
        batch = shape[0] if shape else None
        value = ir.Value(
            name=info.name,
            shape=ir.Shape(_dims(shape, dynamic_batch, batch, info.name)),
            type=ir.TensorType(dtype),
        )
        b.graph.inputs.append(value)
        keras_shape = tuple(kt.shape)
        inputs.append(
            Tensor(
                value, identity(len(keras_shape)), keras_shape, info.dtype, id(kt), counts[id(kt)]
            )
        )
        ctx.layer_values[info.name] = (value, identity(len(keras_shape)))

    outputs = run_function(ctx, function, inputs, "")
    for info, out in zip(loaded.outputs, outputs, strict=True):
        value = b.keras_layout(out)
        if value.is_graph_input() or value.is_graph_output() or value.producer() is None:
            b.layer = info.name
            value = b.op("Identity", [value])
        value.name = info.name
        value.type = ir.TensorType(ir_dtype(out.dtype if out.dtype != "float" else "float32"))
        batch = loaded.inputs[0].shape[0] if loaded.inputs[0].shape else None
        value.shape = ir.Shape(_dims(list(out.shape), dynamic_batch, batch, info.name))
        b.graph.outputs.append(value)
    b.graph.sort()
    ir_version = 8 if opset <= 18 else (9 if opset <= 20 else 10)
    ir_model = ir.Model(b.graph, ir_version=ir_version, producer_name="bnexport")
    return EmitResult(
        model=ir_model,
        records=list(ctx.records),
        bn_nodes=dict(ctx.bn_nodes),
        layer_tensors={layer: value.name for layer, (value, _) in ctx.layer_values.items()},
        layer_perms={
            layer: list(inverse(perm))
            for layer, (_, perm) in ctx.layer_values.items()
            if tuple(perm) != identity(len(perm))
        },
        node_layers=dict(b.node_layers),
    )


def layer_outputs(
    model: Any, emitted: EmitResult, records: list[FoldRecord]
) -> tuple[dict[str, str], dict[str, list[int]]]:
    """``({layer: tensor}, {layer: perm})`` still valid in the final (folded) ``model``.

    Exact, from emission: a layer maps to the tensor it was emitted as, if the fold
    passes kept that tensor; a BN folded backward has no tensor of its own any more.
    """
    produced = {out for node in model.graph.node for out in node.output}
    produced.update(i.name for i in model.graph.input)
    backward = {r.name for r in records if r.action == "folded_backward"}
    mapping, perms = {}, {}
    for layer, tensor in emitted.layer_tensors.items():
        if layer in backward or tensor not in produced:
            continue
        mapping[layer] = tensor
        if layer in emitted.layer_perms:
            perms[layer] = emitted.layer_perms[layer]
    return mapping, perms
