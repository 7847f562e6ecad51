"""The ``bnexport::FusedNorm`` op: its name, attributes and their meaning.

This module is the single contract shared by the exporter (which writes the
ONNX node), the NumPy reference, the CUDA kernel and the TensorRT plugin.

Math, for an input ``X`` whose channel dimension is ``axis`` (size ``C``)::

    affine mode:       Y = act(X * scale[c] + shift[c])
    batch_stats mode:  mean[c], var[c] = moments of X over every axis but ``axis``
                       (over each group of ``virtual_batch_size`` samples if > 0;
                       biased variance), then
                       Y = act((X - mean[c]) / sqrt(var[c] + epsilon) * scale[c] + shift[c])
                       where ``scale`` = gamma and ``shift`` = beta.

Inputs: ``X`` (float32/float16/bfloat16, rank >= 2), ``scale`` and ``shift``
(float32, shape ``[C]``). Outputs: ``Y`` (dtype and shape of ``X``); in
batch_stats mode with ``return_stats=1`` also ``batch_mean`` and ``batch_var``
(float32, ``[C]``, or ``[G, C]`` with ``G = N / virtual_batch_size`` ghost batches).

ONNX node: ``op_type="FusedNorm"``, ``domain="bnexport"``. TensorRT's ONNX parser
maps an unknown op onto the plugin registered under the same name, looking it up
in the namespace given by the ``plugin_namespace`` attribute; every attribute the
plugin declares must be present on the node (the plugin API has no defaults).
"""

from __future__ import annotations

OP_TYPE = "FusedNorm"
DOMAIN = "bnexport"
PLUGIN_NAMESPACE = "bnexport"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
OPSET_VERSION = 1

MODES = ("affine", "batch_stats")
ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu", "sigmoid", "silu")

#: Every attribute written on the node, with its default. Order is the plugin's.
ATTRIBUTE_DEFAULTS: dict[str, int | float | str] = {
    "axis": 1,  # channel axis, non-negative after normalization
    "mode": "affine",  # one of MODES
    "activation": "none",  # one of ACTIVATIONS
    "alpha": 0.01,  # negative slope of leaky_relu (unused otherwise)
    "epsilon": 1e-3,  # variance epsilon (batch_stats mode only)
    "virtual_batch_size": 0,  # ghost-batch size; 0 means the whole batch
    "return_stats": 0,  # batch_stats only: 1 adds batch_mean and batch_var outputs
}


def node_attributes(**overrides: int | float | str) -> dict[str, int | float | str]:
    """Return the full attribute dict for a FusedNorm node (defaults + ``overrides``).

    The result also carries ``plugin_namespace`` so TensorRT's ONNX parser finds
    the plugin. Raises ``PluginError`` naming the field for an unknown attribute
    or an invalid mode/activation value.
    """
    from bnexport.errors import PluginError

    unknown = set(overrides) - set(ATTRIBUTE_DEFAULTS)
    if unknown:
        raise PluginError(f"FusedNorm: unknown attribute(s) {sorted(unknown)}")
    attrs = {**ATTRIBUTE_DEFAULTS, **overrides}
    if attrs["mode"] not in MODES:
        raise PluginError(f"FusedNorm: mode must be one of {MODES}. Received: mode={attrs['mode']!r}")
    if attrs["activation"] not in ACTIVATIONS:
        raise PluginError(
            f"FusedNorm: activation must be one of {ACTIVATIONS}. "
            f"Received: activation={attrs['activation']!r}"
        )
    if int(attrs["virtual_batch_size"]) < 0:
        raise PluginError(
            "FusedNorm: virtual_batch_size must be >= 0. "
            f"Received: virtual_batch_size={attrs['virtual_batch_size']}"
        )
    attrs["plugin_namespace"] = PLUGIN_NAMESPACE
    return attrs
