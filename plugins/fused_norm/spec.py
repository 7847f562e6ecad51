"""The ``bnexport::FusedNorm`` op: its name, attributes and their meaning.

This module is the single contract shared by the exporter (which writes the
ONNX node), the NumPy reference, the CUDA kernel and the TensorRT plugin.

Math, for an input ``X`` whose channel dimension is ``axis`` (size ``C``)::

    affine mode:       Y = act(X * scale[c] + shift[c])
    batch_stats mode:  mean[c], var[c] = moments of X over every axis but ``axis``
                       (over each group of ``virtual_batch_size`` samples along
                       axis 0 if > 0; biased variance), then
                       Y = act((X - mean[c]) / sqrt(var[c] + epsilon) * scale[c] + shift[c])
                       where ``scale`` = gamma and ``shift`` = beta.

Inputs: ``X`` (float32/float16/bfloat16, rank >= 2), ``scale`` and ``shift``
(float32, shape ``[C]``). Outputs: ``Y`` (dtype and shape of ``X``); in
batch_stats mode with ``return_stats=1`` also ``batch_mean`` and ``batch_var``
(float32, ``[C]`` when ``virtual_batch_size == 0``, else ``[G, C]`` with
``G = N / virtual_batch_size`` ghost batches).

ONNX node: ``op_type="FusedNorm"``, ``domain="bnexport"``. TensorRT's ONNX parser
maps an unknown op onto the plugin registered under the same name, looking it up
in the namespace given by the ``plugin_namespace`` attribute; every attribute the
plugin declares must be present on the node (the plugin API has no defaults),
and the node must have exactly as many (non-empty) outputs as the plugin. A
TensorRT plugin has a fixed output count, so the three-output form
(``return_stats=1``) is a second plugin of the same name in the namespace
``PLUGIN_NAMESPACE_STATS``; :func:`node_attributes` writes the right namespace.
"""

from __future__ import annotations

import math
from typing import Any

OP_TYPE = "FusedNorm"
DOMAIN = "bnexport"
PLUGIN_NAMESPACE = "bnexport"
#: Namespace of the three-output plugin (``return_stats=1``); same op name.
PLUGIN_NAMESPACE_STATS = "bnexport_stats"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
PLUGIN_ID_STATS = f"{PLUGIN_NAMESPACE_STATS}::{OP_TYPE}"
OPSET_VERSION = 1

#: Inputs of the node that stay float32 whatever the dtype of ``X`` (``scale``, ``shift``).
FLOAT32_INPUTS: tuple[int, ...] = (1, 2)

MODES = ("affine", "batch_stats")
ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu", "sigmoid", "silu")
#: Activation name -> integer code used by the CUDA kernel (``act`` argument).
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
#: Element types of ``X``/``Y`` (names as numpy / ml_dtypes spell them).
DTYPES = ("float32", "float16", "bfloat16")

#: Every attribute written on the node, with its default. The TensorRT plugin declares
#: them in sorted-name order (:data:`PLUGIN_ATTRIBUTE_ORDER`), the order in which
#: ``onnx.helper.make_node`` writes them and :func:`node_attributes` returns them:
#: TensorRT's ahead-of-time path hands attributes to the plugin positionally in node order.
ATTRIBUTE_DEFAULTS: dict[str, int | float | str] = {
    "axis": 1,  # channel axis, non-negative after normalization
    "mode": "affine",  # one of MODES
    "activation": "none",  # one of ACTIVATIONS
    "alpha": 0.01,  # negative slope of leaky_relu (unused otherwise)
    "epsilon": 1e-3,  # variance epsilon (batch_stats mode only)
    "virtual_batch_size": 0,  # ghost-batch size; 0 means the whole batch
    "return_stats": 0,  # batch_stats only: 1 adds batch_mean and batch_var outputs
}

PLUGIN_ATTRIBUTE_ORDER: tuple[str, ...] = tuple(sorted(ATTRIBUTE_DEFAULTS))

#: Python type of each attribute (the TensorRT plugin's annotations).
ATTRIBUTE_TYPES: dict[str, type] = {
    "axis": int,
    "mode": str,
    "activation": str,
    "alpha": float,
    "epsilon": float,
    "virtual_batch_size": int,
    "return_stats": int,
}


def validate_attributes(attrs: dict[str, int | float | str]) -> dict[str, int | float | str]:
    r"""Check a complete attribute dict and return it with canonical Python types.

    Args:
        attrs: Every key of ``ATTRIBUTE_DEFAULTS`` (extra ``plugin_namespace`` and
            ``plugin_version`` keys are ignored and dropped).

    Returns:
        A new dict with exactly the keys of ``ATTRIBUTE_DEFAULTS``, values cast to
        ``ATTRIBUTE_TYPES`` (``bytes`` strings decoded, trailing NULs stripped: TensorRT's
        ONNX parser hands string fields to plugins with the C terminator counted in their
        length -- onnx-tensorrt ``copyField``, onnx/onnx-tensorrt#921 -- so ``mode``
        arrives as ``"affine\x00"``).

    Raises:
        PluginError: naming the field for an unknown/missing attribute or a bad value.
    """
    from bnexport.errors import PluginError

    extra = set(attrs) - set(ATTRIBUTE_DEFAULTS) - {"plugin_namespace", "plugin_version"}
    if extra:
        raise PluginError(f"FusedNorm: unknown attribute(s) {sorted(extra)}")
    missing = set(ATTRIBUTE_DEFAULTS) - set(attrs)
    if missing:
        raise PluginError(f"FusedNorm: missing attribute(s) {sorted(missing)}")
    out: dict[str, int | float | str] = {}
    for key, typ in ATTRIBUTE_TYPES.items():
        value = attrs[key]
        if getattr(value, "shape", None) in ((), (1,)) and hasattr(value, "item"):
            value = value.item()  # a one-element NumPy plugin field
        if isinstance(value, bytes | bytearray | memoryview):
            value = bytes(value).decode("utf-8")
        if isinstance(value, str):
            value = value.rstrip("\x00")
        try:
            out[key] = typ(value)
        except (TypeError, ValueError) as exc:
            raise PluginError(
                f"FusedNorm: attribute {key} must be {typ.__name__}. Received: {key}={value!r}"
            ) from exc
    if out["mode"] not in MODES:
        raise PluginError(f"FusedNorm: mode must be one of {MODES}. Received: mode={out['mode']!r}")
    if out["activation"] not in ACTIVATIONS:
        raise PluginError(
            f"FusedNorm: activation must be one of {ACTIVATIONS}. "
            f"Received: activation={out['activation']!r}"
        )
    if out["axis"] < 0:
        raise PluginError(f"FusedNorm: axis must be >= 0 on the node. Received: axis={out['axis']}")
    if out["virtual_batch_size"] < 0:
        raise PluginError(
            "FusedNorm: virtual_batch_size must be >= 0. "
            f"Received: virtual_batch_size={out['virtual_batch_size']}"
        )
    if out["return_stats"] not in (0, 1):
        raise PluginError(
            f"FusedNorm: return_stats must be 0 or 1. Received: return_stats={out['return_stats']}"
        )
    if out["return_stats"] and out["mode"] != "batch_stats":
        raise PluginError(
            "FusedNorm: return_stats=1 needs mode='batch_stats'. Received: mode='affine'"
        )
    if out["mode"] == "affine" and out["virtual_batch_size"] != 0:
        raise PluginError(
            "FusedNorm: virtual_batch_size applies to mode='batch_stats' only. "
            f"Received: virtual_batch_size={out['virtual_batch_size']}, mode='affine'"
        )
    if not (math.isfinite(out["epsilon"]) and out["epsilon"] >= 0.0):
        raise PluginError(
            f"FusedNorm: epsilon must be finite and >= 0. Received: epsilon={out['epsilon']}"
        )
    if not math.isfinite(out["alpha"]):
        raise PluginError(f"FusedNorm: alpha must be finite. Received: alpha={out['alpha']}")
    return out


def num_outputs(attrs: dict[str, int | float | str]) -> int:
    """Number of node outputs: 3 with ``return_stats=1`` (Y, batch_mean, batch_var), else 1."""
    return 3 if int(attrs.get("return_stats", 0)) else 1


def plugin_namespace(attrs: dict[str, int | float | str]) -> str:
    """Namespace of the TensorRT plugin that serves a node with these attributes."""
    return PLUGIN_NAMESPACE_STATS if int(attrs.get("return_stats", 0)) else PLUGIN_NAMESPACE


def node_attributes(**overrides: int | float | str) -> dict[str, int | float | str]:
    """Return the full attribute dict for a FusedNorm node (defaults + ``overrides``).

    Keys are in sorted order (see :data:`PLUGIN_ATTRIBUTE_ORDER`). The result also
    carries ``plugin_namespace`` so TensorRT's ONNX parser finds
    the plugin (``PLUGIN_NAMESPACE``, or ``PLUGIN_NAMESPACE_STATS`` when
    ``return_stats=1``). Raises ``PluginError`` naming the field for an unknown
    attribute or an invalid value.
    """
    from bnexport.errors import PluginError

    unknown = set(overrides) - set(ATTRIBUTE_DEFAULTS)
    if unknown:
        raise PluginError(f"FusedNorm: unknown attribute(s) {sorted(unknown)}")
    attrs: dict[str, int | float | str] = validate_attributes({**ATTRIBUTE_DEFAULTS, **overrides})
    attrs["plugin_namespace"] = plugin_namespace(attrs)
    return {key: attrs[key] for key in sorted(attrs)}


def is_fused_norm(node: Any) -> bool:
    """True for a ``bnexport::FusedNorm`` node.

    Works on anything with ``op_type`` and ``domain`` attributes: an ``onnx.NodeProto``
    or an ``onnx_ir.Node``. This is the one place that decides what a FusedNorm node is.
    """
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def _subgraphs(node: Any) -> list[Any]:
    """Graph-valued attributes (``If``/``Loop``/``Scan`` bodies) of an ``onnx.NodeProto``."""
    graphs = []
    for attr in node.attribute:
        if attr.HasField("g"):
            graphs.append(attr.g)
        graphs.extend(attr.graphs)
    return graphs


def has_fused_norm(model_or_graph: Any) -> bool:
    """Whether an ``onnx.ModelProto`` or ``GraphProto`` has a FusedNorm node (subgraphs too)."""
    graph = getattr(model_or_graph, "graph", model_or_graph)
    return any(
        is_fused_norm(node) or any(has_fused_norm(g) for g in _subgraphs(node))
        for node in graph.node
    )


def node_attribute_values(node: Any) -> dict[str, int | float | str]:
    """The validated attributes of a FusedNorm ``onnx.NodeProto`` (defaults filled in).

    Raises:
        PluginError: naming the node, for an unknown attribute or a bad value.
    """
    from onnx import helper

    from bnexport.errors import PluginError

    attrs: dict[str, Any] = {**ATTRIBUTE_DEFAULTS}
    attrs.update({a.name: helper.get_attribute_value(a) for a in node.attribute})
    try:
        return validate_attributes(attrs)
    except PluginError as exc:
        raise PluginError(f"node {node.name or node.output[0]!r}: {exc}") from None
