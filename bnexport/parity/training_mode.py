"""Training-mode parity: Keras ``training=True`` vs the FusedNorm ``batch_stats`` mode.

For every batch-normalization layer of the model, one Keras forward pass in
training mode records the layer's input ``x`` and output ``y_keras`` (the batch
statistics path). The same ``x`` is then normalized by ``bnexport::FusedNorm``
with ``mode="batch_stats"``, the layer's ``gamma``/``beta``/``epsilon``/axis and
its ghost-batch size (``virtual_batch_size``; whole batch when absent)::

    mean[g, c], var[g, c] = moments of x over every axis but c (per ghost batch g)
    y = (x - mean) / sqrt(var + epsilon) * gamma[c] + beta[c]

on three paths, each compared with ``y_keras``:

- ``reference``: the NumPy reference op (float64 moments);
- ``onnxruntime``: a one-node ONNX graph run by onnxruntime
  (:func:`bnexport.runtime.ort_session.make_session`: the plugin's CPU path);
- ``lowered``: the same graph lowered to standard ONNX ops
  (``bnexport_plugins.fused_norm.lowering``), an independent implementation.

The layer's input is taken from the same pass, so upstream randomness (dropout)
does not matter. The model's variables (moving statistics, which Keras updates
in training mode) are restored afterwards. Layers the op cannot express
(several feature axes, renorm, ``adjustment``, ``trainable=False``) are skipped
with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from bnexport.parity.compare import compare_arrays, default_tolerances
from bnexport.parity.report import TrainingModeResult
from bnexport.parity.runners import keras_input_names, keras_module


def iter_bn_layers(model: Any) -> Iterator[Any]:
    """Batch-normalization layers of ``model``, each once, in walk order.

    The walk is :func:`bnexport.layers.walk.bn_layers`: nested models and custom
    ``Layer`` subclasses at any depth.
    """
    from bnexport.layers.walk import bn_layers

    for _, layer in bn_layers(model):
        yield layer


def _feature_axis(layer: Any, rank: int) -> int | str:
    axis = layer.axis
    if isinstance(axis, list | tuple):
        if len(axis) != 1:
            return f"several feature axes {list(axis)}"
        axis = axis[0]
    axis = int(axis)
    return axis + rank if axis < 0 else axis


def _skip_reason(layer: Any) -> str:
    if not layer.trainable:
        return "trainable=False: Keras normalizes with the moving statistics"
    if getattr(layer, "renorm", False):
        return "batch renormalization is not a FusedNorm mode"
    if getattr(layer, "adjustment", None) is not None:
        return "adjustment is not a FusedNorm mode"
    return ""


def _params(layer: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    gamma = getattr(layer, "gamma", None)
    beta = getattr(layer, "beta", None)
    g = np.ones(channels, np.float32) if gamma is None else np.asarray(gamma, np.float32)
    b = np.zeros(channels, np.float32) if beta is None else np.asarray(beta, np.float32)
    return g.reshape(-1), b.reshape(-1)


def _one_node_model(shape: tuple[int, ...], dtype: np.dtype, attrs: dict[str, Any]) -> Any:
    """A graph ``Y = FusedNorm(X, scale, shift)`` with static shapes."""
    from bnexport_plugins.fused_norm.onnx_node import make_node, opset_import
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    c = shape[attrs["axis"]]
    graph = helper.make_graph(
        [make_node(["X", "scale", "shift"], ["Y"], name="bn", **attrs)],
        "fused_norm_batch_stats",
        [
            helper.make_tensor_value_info("X", elem, list(shape)),
            helper.make_tensor_value_info("scale", helper.TensorProto.FLOAT, [c]),
            helper.make_tensor_value_info("shift", helper.TensorProto.FLOAT, [c]),
        ],
        [helper.make_tensor_value_info("Y", elem, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()])
    model.ir_version = 8
    return model


def _paths(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, attrs: dict[str, Any]
) -> dict[str, np.ndarray]:
    """FusedNorm batch_stats of ``x`` on the reference, onnxruntime and lowered paths."""
    from bnexport_plugins.fused_norm.lowering import lower_fused_norm
    from bnexport_plugins.fused_norm.reference import fused_norm

    from bnexport.runtime.ort_session import make_session

    out = {"reference": np.asarray(fused_norm(x, gamma, beta, **attrs))}
    model = _one_node_model(x.shape, x.dtype, attrs)
    feed = {"X": x, "scale": gamma, "shift": beta}
    out["onnxruntime"] = make_session(model).run(["Y"], feed)[0]
    out["lowered"] = make_session(lower_fused_norm(model)).run(["Y"], feed)[0]
    return out


def check_training_mode(
    model: Any,
    feed: Mapping[str, np.ndarray],
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[TrainingModeResult]:
    """Check every BN layer's training-mode output against FusedNorm ``batch_stats``.

    Args:
        model: the Keras model (its variables are restored after the pass).
        feed: ``{input name: array}`` (ONNX or Keras input names), or one array per
            Keras input in order; the whole feed is one batch.
        rtol: relative tolerance (default: by the layer input's dtype).
        atol: absolute tolerance (default: by the layer input's dtype).

    Returns:
        One :class:`TrainingModeResult` per BN layer.
    """
    kmod = keras_module(model)
    layers = list(iter_bn_layers(model))
    results = [TrainingModeResult(layer=layer.name) for layer in layers]
    probe_layers = []
    for layer, result in zip(layers, results, strict=True):
        result.skipped = _skip_reason(layer)
        if not result.skipped:
            try:
                layer.input  # noqa: B018 - raises for shared layers
                probe_layers.append((layer, result))
            except (AttributeError, ValueError) as exc:
                result.skipped = f"no single input/output: {exc}"
    if not probe_layers:
        return results
    names = keras_input_names(model)
    arrays = [feed[n] for n in names] if set(names) <= set(feed) else list(feed.values())
    tensors = []
    for layer, _ in probe_layers:
        tensors += [layer.input, layer.output]
    probe = kmod.Model(model.inputs, tensors, name=f"{model.name}_bn_probe")
    saved = [np.array(v) for v in model.variables]
    try:
        values = probe(list(arrays), training=True)
    finally:
        for var, value in zip(model.variables, saved, strict=True):
            var.assign(value)
    values = [np.asarray(v) for v in values]
    for i, (layer, result) in enumerate(probe_layers):
        x, y_keras = values[2 * i], values[2 * i + 1]
        axis = _feature_axis(layer, x.ndim)
        if isinstance(axis, str):
            result.skipped = axis
            continue
        vbs = int(getattr(layer, "virtual_batch_size", None) or 0)
        if vbs and x.shape[0] % vbs:
            result.skipped = f"batch {x.shape[0]} is not a multiple of virtual_batch_size={vbs}"
            continue
        result.virtual_batch_size = vbs
        gamma, beta = _params(layer, x.shape[axis])
        attrs = {
            "axis": axis,
            "mode": "batch_stats",
            "epsilon": float(layer.epsilon),
            "virtual_batch_size": vbs,
        }
        d_rtol, d_atol = default_tolerances(x.dtype)
        tol = {
            "rtol": d_rtol if rtol is None else float(rtol),
            "atol": d_atol if atol is None else float(atol),
        }
        for path, y in _paths(x, gamma, beta, attrs).items():
            result.comparisons[path] = compare_arrays(layer.name, y_keras, y, **tol)
    return results
