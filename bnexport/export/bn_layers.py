"""Find the batch-normalization layers of a Keras model and compute their affine form.

Every kind is recognized: this project's ``BatchNormalization`` /
``SyncBatchNormalization``, ``keras.layers.BatchNormalization`` (Keras 3) and
tf.keras's (the ``tf_keras`` package, ``SyncBatchNormalization`` included), at any
depth of nested models. In inference mode each is the per-channel affine map::

    y = x · scale + shift,   scale = γ / sqrt(var + ε),   shift = β − μ · scale

computed in float64 by :func:`bnexport.export.fold_math.bn_scale_shift` from the
layer's own variables (renorm, virtual batches and momentum only matter in training).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from bnexport.errors import ExportError
from bnexport.export.fold_math import bn_scale_shift


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


def is_batch_norm(layer: Any) -> bool:
    """Whether ``layer`` is a batch-normalization layer of any supported kind.

    Duck-typed on the class hierarchy name (``*BatchNormalization``) and the
    inference variables, so Keras 3, tf.keras and bnexport layers all match.
    """
    names = [cls.__name__ for cls in type(layer).__mro__]
    if not any(n.endswith("BatchNormalization") or n == "BatchNormalizationBase" for n in names):
        return False
    return all(hasattr(layer, attr) for attr in ("moving_mean", "moving_variance", "epsilon"))


def is_model(layer: Any) -> bool:
    """Whether ``layer`` is a (nested) model whose layers must be walked."""
    return any(cls.__name__ in ("Functional", "Sequential", "Model") for cls in type(layer).__mro__)


def walk_layers(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, layer)`` for every layer, depth first, nested models included."""
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        yield path, layer
        if is_model(layer):
            yield from walk_layers(layer, prefix=f"{path}/")


def unique_names(model: Any) -> dict[int, str]:
    """``{id(layer): name}``: the layer's own name, or its path where names repeat."""
    entries = list(walk_layers(model))
    counts = Counter(layer.name for _, layer in entries)
    names: dict[int, str] = {}
    for path, layer in entries:
        names.setdefault(id(layer), layer.name if counts[layer.name] == 1 else path)
    return names


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
    """Every BN layer of ``model`` (nested models included), in layer order.

    A layer object shared by several nested models is listed once.
    """
    names = unique_names(model)
    found: list[BNLayer] = []
    seen: set[int] = set()
    for _, layer in walk_layers(model):
        if id(layer) in seen or not is_batch_norm(layer):
            continue
        seen.add(id(layer))
        found.append(bn_from_layer(layer, names[id(layer)]))
    return found
