"""Patches applied to a Keras model's layer *instances* while it is traced.

* every BN layer's ``call`` becomes ``x · scale + shift`` with ``scale``/``shift`` read
  from placeholders of the traced function, the ops named ``bnexport_bn<i>_mul`` /
  ``bnexport_bn<i>_add`` (see :mod:`bnexport.export.trace`);
* a Keras 3 grouped ``Conv1D``/``Conv2D`` emits one plain TF ``Conv2D`` op;
* every layer's ``call`` is wrapped to record the TF ops it creates and its output tensor.

The layers are those of :func:`bnexport.layers.walk.walk_layers`: nested models' and
custom ``Layer`` subclasses' sublayers at any depth, each object once.

All patches are instance attributes, removed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from bnexport.export.bn_layers import BNLayer
from bnexport.layers.walk import display_names, is_model, walk_layers

#: ONNX node names of BN-derived nodes: ``.../bnexport_bn<i>_mul`` (``_add``)
BN_NODE_RE = re.compile(r"(?:^|/)bnexport_bn(\d+)_(mul|add)(?:_\d+)?$")


class TraceState:
    """What the patched layers read and write while the function is traced."""

    def __init__(self) -> None:
        self.params: dict[int, tuple[Any, Any]] = {}
        self.layer_tensors: dict[str, str] = {}
        self.layer_shapes: dict[str, list[int | None]] = {}
        self.op_layers: dict[str, str] = {}
        self.calls: dict[str, int] = {}


def _bn_call(tf: Any, bn: BNLayer, index: int, state: TraceState) -> Any:
    """The inference computation of ``bn`` as ``x · scale + shift`` (float32 math)."""

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        scale, shift = state.params[index]
        rank = inputs.shape.rank
        shape = bn.broadcast_shape(rank)
        x = inputs
        if x.dtype != tf.float32:  # 16-bit inputs: compute in float32 like Keras does
            x = tf.cast(x, tf.float32)
        if list(scale.shape) != shape:
            scale = tf.reshape(scale, shape)
            shift = tf.reshape(shift, shape)
        y = tf.multiply(x, scale, name=f"bnexport_bn{index}_mul")
        y = tf.add(y, shift, name=f"bnexport_bn{index}_add")
        return tf.cast(y, inputs.dtype) if inputs.dtype != tf.float32 else y

    return call


def _grouped_conv_call(tf: Any, layer: Any) -> Any:
    """``call`` for a Keras 3 grouped ``Conv1D``/``Conv2D``: one TF ``Conv2D`` op (module doc).

    Same math as Keras: (causal padding), convolution, bias, activation.
    """
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    rank = layer.rank

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        strides = list(layer.strides)
        dilations = list(layer.dilation_rate)
        padding = str(layer.padding).lower()
        x, k = inputs, tf.cast(layer.kernel, inputs.dtype)
        if padding == "causal":  # Conv1D only: pad the time axis on the left
            left = dilations[0] * (int(layer.kernel_size[0]) - 1)
            pads = [[0, 0], [left, 0], [0, 0]] if channels_last else [[0, 0], [0, 0], [left, 0]]
            x = tf.pad(x, pads)
            padding = "valid"
        if rank == 1:  # [N, W, C] -> [N, 1, W, C]
            x = tf.expand_dims(x, 1 if channels_last else 2)
            k = tf.expand_dims(k, 0)
            strides, dilations = [1, *strides], [1, *dilations]
        full = (lambda v: [1, *v, 1]) if channels_last else (lambda v: [1, 1, *v])
        y = tf.raw_ops.Conv2D(
            input=x,
            filter=k,
            strides=full(strides),
            padding=padding.upper(),
            data_format="NHWC" if channels_last else "NCHW",
            dilations=full(dilations),
        )
        if rank == 1:
            y = tf.squeeze(y, 1 if channels_last else 2)
        if layer.use_bias:
            y = tf.nn.bias_add(
                y, tf.cast(layer.bias, y.dtype), data_format="N...C" if channels_last else "NC..."
            )
        if layer.activation is not None:
            y = layer.activation(y)
        return y

    return call


def _is_keras3_grouped_conv(layer: Any) -> bool:
    return (
        type(layer).__module__.startswith("keras.")
        and int(getattr(layer, "groups", 1) or 1) > 1
        and getattr(layer, "rank", None) in (1, 2)
        and hasattr(layer, "kernel")
        and str(getattr(layer, "padding", "")).lower() in ("valid", "same", "causal")
    )


def _recording_call(tf: Any, orig: Any, name: str, state: TraceState) -> Any:
    """Wrap ``orig`` so the ops it creates and its output tensor are attributed to ``name``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        graph = tf.compat.v1.get_default_graph()
        before = len(graph.get_operations())
        out = orig(*args, **kwargs)
        for op in graph.get_operations()[before:]:
            state.op_layers.setdefault(op.name, name)
        state.calls[name] = state.calls.get(name, 0) + 1
        if tf.is_tensor(out) and hasattr(out, "name"):
            state.layer_tensors[name] = out.name
            if out.shape.rank is not None:
                state.layer_shapes[name] = [None, *out.shape.as_list()[1:]]
        return out

    return call


@contextlib.contextmanager
def patched_layers(model: Any, bns: list[BNLayer], state: TraceState) -> Iterator[None]:
    """Patch BN layers, grouped convs and output recording on the model's instances.

    Every patch is an instance attribute; all are removed in a ``finally``, so the model
    behaves as before even if tracing fails or is interrupted.
    """
    import tensorflow as tf

    patched: list[tuple[Any, str, Any]] = []  # (object, attribute, previous value or None)

    def set_attr(obj: Any, attr: str, value: Any) -> None:
        previous = obj.__dict__.get(attr, _MISSING)
        object.__setattr__(obj, attr, value)
        patched.append((obj, attr, previous))

    try:
        bn_index = {id(bn.layer): i for i, bn in enumerate(bns)}
        names = display_names(model)
        for _, layer in walk_layers(model):  # every tracked layer, custom blocks' too, once
            if is_model(layer):
                continue
            if id(layer) in bn_index:
                i = bn_index[id(layer)]
                call = _bn_call(tf, bns[i], i, state)
            elif _is_keras3_grouped_conv(layer):
                call = _grouped_conv_call(tf, layer)
            else:
                call = layer.call
            set_attr(layer, "call", _recording_call(tf, call, names[id(layer)], state))
        yield
    finally:
        for obj, attr, previous in reversed(patched):
            if previous is _MISSING:
                with contextlib.suppress(AttributeError, KeyError):
                    object.__delattr__(obj, attr)
            else:
                object.__setattr__(obj, attr, previous)


_MISSING = object()
