"""Find the batch-normalization layers of a Keras model and compute their affine form.

Every kind is recognized: this project's ``BatchNormalization`` /
``SyncBatchNormalization``, ``keras.layers.BatchNormalization`` (Keras 3) and
tf.keras's (the ``tf_keras`` package, ``SyncBatchNormalization`` included), at any
depth: nested models and custom ``Layer`` subclasses alike (the walk is
:mod:`bnexport.layers.walk`, which follows Keras's own layer tracking).
In inference mode each is the per-channel affine map::

    y = x · scale + shift,   scale = γ / sqrt(var + ε),   shift = β − μ · scale

computed in float64 by :func:`bnexport.export.fold_math.bn_scale_shift` from the
layer's own variables (renorm, virtual batches and momentum only matter in training).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bnexport.errors import ExportError
from bnexport.export.fold_math import bn_scale_shift
from bnexport.layers.walk import display_names, is_batch_norm, is_model, walk_layers

__all__ = [
    "BNLayer",
    "bn_from_layer",
    "find_bn_layers",
    "is_batch_norm",
    "is_model",
    "unique_names",
    "walk_layers",
]


@dataclasses.dataclass
class BNLayer:
    """One batch-normalization layer of a model, in inference form.

    Attributes:
        layer: the layer object.
        name: unique name in the model (``outer/inner`` when a nested model repeats it).
        axes: the normalized axes as given by the layer (may be negative).
        param_shape: shape of the layer's statistics (``[C]`` for one axis).
        scale: float64 ``param_shape`` — ``γ / sqrt(var + ε)``.
        shift: float64 ``param_shape`` — ``β − μ · scale``.
    """

    layer: Any
    name: str
    axes: tuple[int, ...]
    param_shape: tuple[int, ...]
    scale: np.ndarray
    shift: np.ndarray

    def broadcast_shape(self, rank: int) -> list[int]:
        """Shape that broadcasts ``scale``/``shift`` against an input of ``rank``.

        ``[C]`` when the only axis is the last one (like Keras), else rank-long with
        the normalized axes' sizes and 1 elsewhere.
        """
        axes = sorted(a % rank for a in self.axes)
        if axes == [rank - 1]:
            return [int(np.prod(self.param_shape))]
        shape = [1] * rank
        sizes = list(self.param_shape) if len(self.param_shape) == len(axes) else None
        if sizes is None:  # flat [C] statistics for a single axis
            sizes = [int(np.prod(self.param_shape))]
        for axis, size in zip(axes, sizes, strict=True):
            shape[axis] = int(size)
        return shape


def unique_names(model: Any) -> dict[int, str]:
    """``{id(layer): name}`` as reports show it (:func:`bnexport.layers.walk.display_names`)."""
    return display_names(model)


def _numpy(variable: Any) -> np.ndarray | None:
    if variable is None:
        return None
    if hasattr(variable, "numpy"):
        return np.asarray(variable.numpy())
    return np.asarray(variable)


def _axes(layer: Any) -> tuple[int, ...]:
    axis = layer.axis
    if isinstance(axis, int | np.integer):
        return (int(axis),)
    return tuple(int(a) for a in axis)


def bn_from_layer(layer: Any, name: str) -> BNLayer:
    """Read one BN layer's variables and compute its float64 ``(scale, shift)``.

    Raises:
        ExportError: the layer is not built, or its statistics are NaN/Inf or the
            variance is negative (names the layer).
    """
    if not getattr(layer, "built", True) or getattr(layer, "moving_mean", None) is None:
        raise ExportError(f"{name}: batch normalization layer is not built (no statistics)")
    mean = _numpy(layer.moving_mean)
    var = _numpy(layer.moving_variance)
    gamma = _numpy(getattr(layer, "gamma", None)) if getattr(layer, "scale", True) else None
    beta = _numpy(getattr(layer, "beta", None)) if getattr(layer, "center", True) else None
    param_shape = tuple(int(d) for d in mean.shape)
    scale, shift = bn_scale_shift(gamma, beta, mean, var, float(layer.epsilon), name=name)
    return BNLayer(
        layer=layer,
        name=name,
        axes=_axes(layer),
        param_shape=param_shape,
        scale=scale.reshape(param_shape),
        shift=shift.reshape(param_shape),
    )


def find_bn_layers(model: Any) -> list[BNLayer]:
    """Every BN layer of ``model`` (nested models and custom layers included), walk order.

    A layer object reused in several places is listed once; its name is the one
    :func:`bnexport.layers.walk.display_names` gives (``block/bn`` inside a custom layer).
    """
    names = display_names(model)
    return [
        bn_from_layer(layer, names[id(layer)])
        for _, layer in walk_layers(model)
        if is_batch_norm(layer)
    ]
