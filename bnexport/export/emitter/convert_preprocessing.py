"""Preprocessing and inference no-ops: ``Rescaling``, ``Normalization``, dropouts, noise.

* ``Rescaling``: ``x·scale + offset`` (``Mul``, ``Add``; an array ``scale`` broadcasts in
  Keras layout, reshaped to ``[C, 1, 1]`` when Keras's image format is channels-first, as
  the layer itself does);
* ``Normalization``: ``(x − mean) / max(√var, ε)`` (``invert``: ``mean + x·max(√var, ε)``)
  with the layer's own ``mean``/``variance`` (already shaped to broadcast) and Keras's ε;
* ``Dropout`` and friends, ``GaussianNoise``, ``ActivityRegularization``, ``Identity``:
  inference is the identity, so no node is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnexport.export.emitter.convert_conv import numpy_of
from bnexport.export.emitter.registry import EmitContext, register
from bnexport.export.emitter.values import Tensor


@register("Rescaling")
def rescaling(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Rescaling(scale, offset)``."""
    from keras import backend

    x = args[0]
    b = ctx.b
    scale = np.asarray(numpy_of(layer.scale) if hasattr(layer.scale, "shape") else layer.scale)
    offset = np.asarray(numpy_of(layer.offset) if hasattr(layer.offset, "shape") else layer.offset)
    if scale.ndim and backend.image_data_format() == "channels_first":
        scale = scale.reshape(scale.shape + (1,) * (3 - scale.ndim))
    value = b.op(
        "Mul", [x.value, b.broadcast_const(scale.astype(np.float32), x.perm, x.rank, "scale")]
    )
    if np.any(offset != 0):
        offset_c = b.broadcast_const(offset.astype(np.float32), x.perm, x.rank, "offset")
        value = b.op("Add", [value, offset_c])
    return ctx.out(value, x.perm)


@register("Normalization")
def normalization(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """``Normalization`` with its adapted or given statistics."""
    from keras import backend

    x = args[0]
    b = ctx.b
    if layer.mean is None:
        raise ctx.unsupported("Normalization layer is not built")
    mean = numpy_of(layer.mean).astype(np.float32)
    denom = np.maximum(np.sqrt(numpy_of(layer.variance).astype(np.float32)), backend.epsilon())
    mean_c = b.broadcast_const(mean, x.perm, x.rank, "mean")
    denom_c = b.broadcast_const(denom.astype(np.float32), x.perm, x.rank, "std")
    if layer.invert:
        value = b.op("Add", [b.op("Mul", [x.value, denom_c]), mean_c])
    else:
        value = b.op("Div", [b.op("Sub", [x.value, mean_c]), denom_c])
    return ctx.out(value, x.perm)


@register(
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
)  # fmt: skip
def inference_identity(ctx: EmitContext, layer: Any, args: tuple, kwargs: dict) -> Tensor:
    """A layer that is the identity at inference: the input passes through, no node."""
    x = args[0]
    return ctx.out(x.value, x.perm, linear=x.linear if x.consumers == 1 else None)
