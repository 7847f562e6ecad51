"""Per-layer parity: expose intermediate ONNX tensors and line them up with Keras layers.

Which ONNX tensor holds which Keras layer's output comes from the exporter: it
writes the model metadata entry ``bnexport.layer_outputs`` = JSON
``{keras layer name: onnx tensor name}``. For graphs produced by other tools
(plain tf2onnx), :func:`layer_output_map` falls back to a name heuristic: the
last node, in graph order, whose name has the layer's name scope as a path
component (``model_1/conv1_1/Conv2D`` -> layer ``conv1``); the report says which
source was used.

Layers are ordered by the position of the node producing their tensor in the
ONNX graph (a topological order of the exported computation), so "the first
layer whose error exceeds tolerance" is where divergence starts.

Exported graphs may hold activations channels-first while Keras holds them
channels-last (tf2onnx transposes convolutions to NCHW): :func:`align` moves the
channel axis back when that is the only difference.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

METADATA_KEY = "bnexport.layer_outputs"
PERMS_KEY = "bnexport.layer_output_perms"


def metadata_layer_map(model: Any) -> dict[str, str] | None:
    """The exporter's ``{layer: tensor}`` map from the model metadata, or ``None``."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            value = json.loads(prop.value)
            return {str(k): str(v) for k, v in value.items()}
    return None


def metadata_layer_perms(model: Any) -> dict[str, list[int]]:
    """The exporter's ``{layer: perm}`` (``keras value = onnx value.transpose(perm)``)."""
    for prop in model.metadata_props:
        if prop.key == PERMS_KEY:
            return {str(k): [int(p) for p in v] for k, v in json.loads(prop.value).items()}
    return {}


def inferred_layer_perms(model: Any, mapping: Mapping[str, str]) -> dict[str, list[int]]:
    """``{layer: perm}`` from the layouts propagated through the graph's Transposes.

    Uses the exporter's layout propagation (``bnexport.export.layer_map.tensor_layouts``:
    graph inputs are in Keras layout, Transposes compose, layout-preserving ops keep
    it); layers whose tensor layout is unknown are left out (shape-based guess later).
    """
    try:
        from bnexport.export.layer_map import tensor_layouts
    except ImportError:
        return {}
    layouts = tensor_layouts(model)
    perms: dict[str, list[int]] = {}
    for layer, tensor in mapping.items():
        q = layouts.get(tensor)
        if q is not None:
            inverse = [0] * len(q)
            for i, axis in enumerate(q):
                inverse[axis] = i
            perms[layer] = inverse
    return perms


def heuristic_layer_map(model: Any, layer_names: Iterable[str]) -> dict[str, str]:
    """Guess ``{layer: tensor}`` from node name scopes (tf2onnx naming).

    A path component ``C`` of a node name belongs to layer ``L`` when ``C == L``,
    or when ``C`` is ``L`` plus a ``_<digits>`` uniquifying suffix and no layer
    is named ``C`` itself. The layer's tensor is the first output of the last
    such node in graph order.
    """
    names = set(layer_names)
    owner_cache: dict[str, str | None] = {}

    def owner(component: str) -> str | None:
        if component not in owner_cache:
            found = component if component in names else None
            if found is None:
                m = re.fullmatch(r"(.+)_\d+", component)
                if m and m.group(1) in names:
                    found = m.group(1)
            owner_cache[component] = found
        return owner_cache[component]

    mapping: dict[str, str] = {}
    for node in model.graph.node:
        parts = node.name.split("/")
        if len(parts) < 2 or not node.output:
            continue
        for comp in parts[:-1]:
            layer = owner(comp)
            if layer is not None:
                mapping[layer] = node.output[0]  # later nodes overwrite: keep the last
                break
    return mapping


def layer_output_map(model: Any, layer_names: Iterable[str]) -> tuple[dict[str, str], str]:
    """``({layer: tensor}, source)`` with source ``"metadata"`` or ``"heuristic"``."""
    found = metadata_layer_map(model)
    if found is not None:
        return found, "metadata"
    return heuristic_layer_map(model, layer_names), "heuristic"


def producer_index(model: Any) -> dict[str, int]:
    """``{tensor name: index of the node producing it}`` (graph inputs get -1)."""
    index = {vi.name: -1 for vi in model.graph.input}
    for i, node in enumerate(model.graph.node):
        for out in node.output:
            if out:
                index[out] = i
    return index


def _inferred_types(model: Any) -> dict[str, Any]:
    """``{tensor: ValueInfoProto}`` from the graph and ONNX shape inference."""
    import onnx

    known = {vi.name: vi for vi in (*model.graph.value_info, *model.graph.output)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for vi in inferred.graph.value_info:
            known.setdefault(vi.name, vi)
    except Exception:  # noqa: BLE001 - custom ops or big models: fall back below
        pass
    return known


def expose_tensors(model: Any, tensors: Sequence[str]) -> Any:
    """A copy of ``model`` whose graph also outputs ``tensors`` (the original is untouched).

    Output types come from the graph's value_info or ONNX shape inference; a
    ``bnexport::FusedNorm`` output takes the element type of its ``X`` input;
    anything else gets an untyped output (onnxruntime accepts it).
    """
    from onnx import helper

    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    known = _inferred_types(probe)
    for node in probe.graph.node:  # FusedNorm: Y has X's element type
        if node.op_type == "FusedNorm" and node.output and node.output[0] not in known:
            x = known.get(node.input[0])
            if x is not None:
                known[node.output[0]] = helper.make_tensor_value_info(
                    node.output[0], x.type.tensor_type.elem_type, None
                )
    for name in tensors:
        if name in existing:
            continue
        vi = known.get(name)
        if vi is not None and vi.type.tensor_type.elem_type:
            out = copy.deepcopy(vi)
            out.name = name
        else:
            out = helper.make_empty_tensor_value_info(name)
        probe.graph.output.append(out)
        existing.add(name)
    return probe


def align(
    keras_value: np.ndarray, onnx_value: np.ndarray, perm: Sequence[int] | None = None
) -> tuple[np.ndarray | None, str]:
    """Bring an ONNX activation into the Keras layout.

    Args:
        keras_value: the Keras layer output.
        onnx_value: the ONNX tensor value.
        perm: the permutation for this layer (``keras = onnx.transpose(perm)``) if
            known; otherwise the layout is guessed from the shapes, and a shape that
            reads the same both ways (C == H == W) is refused as ambiguous.

    Returns:
        ``(aligned array or None, layout note)`` with the note ``"same"``,
        ``"channels_first->last"``, ``"channels_last->first"``, ``"reshaped"``
        (equal after dropping size-1 dims) or, with ``None``, why it cannot be aligned.
    """
    k, o = keras_value.shape, onnx_value.shape
    if perm is not None and len(perm) == onnx_value.ndim:
        if list(perm) == list(range(onnx_value.ndim)):
            if o == k:
                return onnx_value, "same"
            return None, f"shape mismatch: keras {tuple(k)}, onnx {tuple(o)}"
        moved = np.transpose(onnx_value, perm)
        if moved.shape == k:
            return moved, f"transpose{tuple(int(p) for p in perm)}"
        return None, f"shape mismatch after transpose{tuple(perm)}: keras {k}, onnx {o}"
    if len(k) == len(o) >= 3:
        first = o == (k[0], k[-1], *k[1:-1])
        last = o == (k[0], *k[2:], k[1])
        if k == o and (first or last):
            return None, f"layout ambiguous: shape {tuple(k)} reads the same channels-first/last"
        if first:
            return np.moveaxis(onnx_value, 1, -1), "channels_first->last"
        if last:
            return np.moveaxis(onnx_value, -1, 1), "channels_last->first"
    if k == o:
        return onnx_value, "same"
    if tuple(d for d in k if d != 1) == tuple(d for d in o if d != 1):
        return onnx_value.reshape(k), "reshaped"
    return None, f"shape mismatch: keras {tuple(k)}, onnx {tuple(o)}"


def named_layers(keras_model: Any) -> dict[str, Any]:
    """``{name: layer}`` for every layer Keras tracks under the model, nested ones too.

    Names are those the exporter writes in its layer map
    (:func:`bnexport.layers.walk.display_names`): a layer of the model's graph, or of a
    nested model, by its name; a layer inside a custom ``Layer`` block by its path
    (``block/conv``).
    """
    from bnexport.layers.walk import display_names, walk_layers

    names = display_names(keras_model)
    return {names[id(layer)]: layer for _, layer in walk_layers(keras_model)}


def probeable_layers(
    keras_model: Any,
    mapping: Mapping[str, str],
    model: Any,
    layers: Mapping[str, Any] | None = None,
) -> tuple[list[str], dict[str, str], set[str]]:
    """Layers that can be compared (graph order), why others are not, which are captured.

    A layer of the model's own graph with a single call site is read from its
    ``.output`` (the model is rewired); any other layer in ``layers`` (nested in a
    custom block or a nested model) is *captured*: its ``call`` output is recorded while
    the model runs. A layer is skipped when it is an input layer, is unknown, has
    several call sites in the graph, or maps to a graph input or initializer.

    Returns:
        ``(ordered layer names, {skipped layer: reason}, {captured layer names})``.
    """
    order = producer_index(model)
    inits = {i.name for i in model.graph.initializer}
    keep: list[tuple[int, int, str]] = []
    skipped: dict[str, str] = {}
    captured: set[str] = set()
    keras_index = {layer.name: i for i, layer in enumerate(keras_model.layers)}
    nested = dict(layers or {})
    position = {name: i for i, name in enumerate(nested)}
    for name, tensor in mapping.items():
        if name in keras_index:
            layer = keras_model.get_layer(name)
        elif name in nested:
            layer = nested[name]
            captured.add(name)
        else:
            skipped[name] = "no Keras layer with this name"
            continue
        if type(layer).__name__ == "InputLayer":
            captured.discard(name)
            continue
        if name not in captured:
            try:
                layer.output  # noqa: B018 - raises for layers called several times
            except (AttributeError, ValueError) as exc:
                skipped[name] = f"no single output: {exc}"
                continue
        if tensor in inits or order.get(tensor, 0) < 0:
            skipped[name] = f"tensor {tensor!r} is a graph input or initializer"
            captured.discard(name)
            continue
        if tensor not in order:
            skipped[name] = f"tensor {tensor!r} is not in the ONNX graph"
            captured.discard(name)
            continue
        keep.append((order[tensor], keras_index.get(name, len(keras_index) + position[name]), name))
    keep.sort()
    return [name for _, _, name in keep], skipped, captured
