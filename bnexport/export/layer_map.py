"""Map Keras layers to the ONNX tensors that carry their outputs (for the parity checker).

Derivation
----------
1. While tracing, each layer's ``call`` is wrapped and the TF name of the tensor it
   returns is recorded (``model/conv_1/BiasAdd:0``); tf2onnx names ONNX tensors after
   the TF tensors it converts, so a layer maps to the ONNX tensor of the same name.
   Layers whose tensor disappears (merged away by grappler/tf2onnx, e.g. a zero bias
   add or an identity) are left out.
2. Folding keeps a BN's output name: the folded ``Conv`` (or the fused node) takes over
   the BN's output tensor and name, so a BN folded forward or fused maps to that
   tensor, and the layer before it (whose own tensor no longer exists) is left out. A
   BN folded *backward* has no tensor of its own any more and is left out.
3. tf2onnx runs NHWC models in NCHW internally. The layout of each mapped tensor is
   found by propagating a permutation from the graph inputs (which are in Keras layout)
   through ``Transpose`` nodes; shape-preserving ops keep their input's layout, rank-2
   results are ``[batch, features]``. Where propagation is inconclusive the tensor's
   inferred shape must match exactly one candidate layout, otherwise the layer is left out.
   ``layer_output_perms[layer] = perm`` means ``keras_output = onnx_tensor.transpose(perm)``.

Both mappings are written to the model's ``metadata_props`` as JSON under
``bnexport.layer_outputs`` and ``bnexport.layer_output_perms``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from bnexport.export.report import FoldRecord

LAYER_OUTPUTS_KEY = "bnexport.layer_outputs"
LAYER_PERMS_KEY = "bnexport.layer_output_perms"

#: ops whose output keeps the layout of input 0 (elementwise, conv/pool families, norm)
_LAYOUT_KEEPING = {
    "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Conv",
    "ConvTranspose", "Div", "Elu", "Erf", "Exp", "FusedNorm", "HardSigmoid", "HardSwish",
    "Identity", "InstanceNormalization", "LeakyRelu", "Log", "LpPool", "Max", "MaxPool",
    "Min", "Mul", "Neg", "Pad", "PRelu", "Pow", "Reciprocal", "Relu", "Resize", "Selu",
    "Sigmoid", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tanh", "Where",
}  # fmt: skip


def _compose(q: list[int] | None, perm: list[int]) -> list[int] | None:
    if q is None or len(q) != len(perm):
        return None
    return [q[p] for p in perm]


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _light_copy(model: Any, max_elements: int = 4096) -> Any:
    """A copy of ``model`` for shape inference, large weights declared but not copied.

    Shape inference needs the *values* of small constants only (``Reshape`` shapes,
    ``Slice`` bounds); a weight tensor matters by its shape. Initializers with more than
    ``max_elements`` elements become graph inputs of the same type and shape, so
    inference does not serialize the weights (100 MB for ResNet50) each time.
    """
    import onnx

    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    names = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= max_elements:
            graph.initializer.append(init)
        elif init.name not in names:
            graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
            )
    return light


def inferred_shapes(model: Any) -> dict[str, list[int | None]]:
    """``{tensor: shape}`` from ONNX shape inference (lenient); ``{}`` if inference fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(_light_copy(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - custom ops / odd graphs: no shapes, callers degrade
        return {}
    shapes: dict[str, list[int | None]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None
                for d in info.type.tensor_type.shape.dim
            ]
    return shapes


def tensor_layouts(
    model: Any, shapes: dict[str, list[int | None]] | None = None
) -> dict[str, list[int] | None]:
    """``{tensor: q}`` with ``onnx_tensor = keras_tensor.transpose(q)``; ``None`` if unknown.

    ``shapes`` is :func:`inferred_shapes` of ``model`` when the caller has it.
    """
    shapes = inferred_shapes(model) if shapes is None else shapes
    ranks = {name: len(shape) for name, shape in shapes.items()}
    layouts: dict[str, list[int] | None] = {}
    for inp in model.graph.input:
        rank = ranks.get(inp.name)
        if rank is not None:
            layouts[inp.name] = list(range(rank))
    for node in model.graph.node:  # tf2onnx emits nodes in topological order
        first = layouts.get(node.input[0]) if node.input else None
        for out in node.output:
            rank = ranks.get(out)
            q: list[int] | None
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                q = _compose(first, perm) if perm is not None else None
            elif node.op_type in _LAYOUT_KEEPING:
                q = first
            elif rank is not None and rank <= 2:
                q = list(range(rank))
            else:
                q = None
            if q is not None and rank is not None and len(q) != rank:
                q = None
            layouts[out] = q
    return layouts


def _perm_from_shape(
    onnx_shape: list[int | None] | None, keras_shape: list[int | None]
) -> list[int] | None | str:
    """The unique perm (identity or channels-first->last) matching the shapes, else "?"."""
    if onnx_shape is None or len(onnx_shape) != len(keras_shape):
        return "?"
    rank = len(keras_shape)
    candidates = [list(range(rank))]
    if rank >= 3:
        candidates.append([0, *range(2, rank), 1])  # NC... -> N...C
    matches = []
    for perm in candidates:
        permuted = [onnx_shape[p] for p in perm]
        if all(
            k is None or o is None or k == o
            for k, o in zip(keras_shape[1:], permuted[1:], strict=True)
        ):
            matches.append(perm)
    return matches[0] if len(matches) == 1 else "?"


def layer_outputs(
    model: Any,
    layer_tensors: dict[str, str],
    layer_shapes: dict[str, list[int | None]],
    records: list[FoldRecord],
    input_names: dict[str, str],
    output_names: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Derive ``({layer: tensor}, {layer: perm})`` for the final (folded) ``model``.

    Args:
        model: the final ONNX model.
        layer_tensors: ``{layer: TF tensor name}`` recorded while tracing.
        layer_shapes: ``{layer: Keras output shape}`` recorded while tracing.
        records: the fold records (BNs folded backward are left out).
        input_names: ``{input layer name: graph input name}``.
        output_names: ``{output layer name: graph output name}`` (tf2onnx renames the
            tensors of model outputs to the output names).
    """
    produced = {out for node in model.graph.node for out in node.output}
    produced.update(i.name for i in model.graph.input)
    backward = {r.name for r in records if r.action == "folded_backward"}
    shapes = inferred_shapes(model)
    layouts = tensor_layouts(model, shapes)
    mapping: dict[str, str] = {}
    perms: dict[str, list[int]] = {}
    candidates = {**input_names, **layer_tensors}
    for layer, output in (output_names or {}).items():
        if candidates.get(layer) not in produced:
            candidates[layer] = output
    for layer, tensor in candidates.items():
        if layer in backward or tensor not in produced:
            continue
        keras_shape = layer_shapes.get(layer)
        q = layouts.get(tensor)
        if q is not None:
            perm = _inverse(q)
        elif keras_shape is not None:
            found = _perm_from_shape(shapes.get(tensor), keras_shape)
            if found == "?":
                continue
            perm = found  # type: ignore[assignment]
        else:
            continue
        mapping[layer] = tensor
        if perm != list(range(len(perm))):
            perms[layer] = perm
    return mapping, perms


def write_metadata(model: Any, mapping: dict[str, str], perms: dict[str, list[int]]) -> None:
    """Store both mappings as JSON in ``model.metadata_props`` (replacing old entries)."""
    keep = [p for p in model.metadata_props if p.key not in (LAYER_OUTPUTS_KEY, LAYER_PERMS_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in ((LAYER_OUTPUTS_KEY, mapping), (LAYER_PERMS_KEY, perms)):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value, sort_keys=True)
