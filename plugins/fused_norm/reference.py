"""NumPy reference of ``bnexport::FusedNorm``: the single definition of the op's numbers.

Math (``c`` indexes the channel axis, ``g`` the ghost batch)::

    affine:       Y = act(X * scale[c] + shift[c])
    batch_stats:  mean[g, c] = E[X[g, ..., c, ...]]            over all axes but ``axis``
                  var[g, c]  = E[(X[g, ..., c, ...] - mean)^2]  (biased, two-pass)
                  Y = act((X - mean[g, c]) / sqrt(var[g, c] + epsilon) * scale[c] + shift[c])

    act: none | relu | relu6 = min(max(v, 0), 6) | leaky_relu = v if v >= 0 else alpha * v
         | sigmoid = 1 / (1 + exp(-v)) | silu = v * sigmoid(v)

All arithmetic is float64 (moments with the two-pass formula, so a large mean
costs no precision), and ``Y`` is rounded once to the dtype of ``X`` (float32,
float16 or ml_dtypes.bfloat16). Statistics are returned as float32, shape
``[C]`` (``virtual_batch_size == 0``) or ``[G, C]``.

CPU runtimes look ops up in :data:`REFERENCE_OPS` (filled by :func:`register`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from bnexport_plugins.fused_norm import spec
from bnexport_plugins.fused_norm.checks import Geometry, check_inputs

#: op type -> NumPy implementation ``f(*inputs, **attributes)``.
REFERENCE_OPS: dict[str, Callable[..., np.ndarray | tuple[np.ndarray, ...]]] = {}


def register(op_type: str) -> Callable[[Callable], Callable]:
    """Decorator: record ``func`` as the NumPy implementation of ``op_type``."""

    def decorator(func: Callable) -> Callable:
        REFERENCE_OPS[op_type] = func
        return func

    return decorator


def activation(v: np.ndarray, name: str, alpha: float = 0.01) -> np.ndarray:
    """Apply activation ``name`` (one of ``spec.ACTIVATIONS``) elementwise, in v's dtype."""
    if name == "none":
        return v
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "relu6":
        return np.clip(v, 0.0, 6.0)
    if name == "leaky_relu":
        return np.where(v >= 0.0, v, alpha * v)
    if name == "sigmoid":
        return _sigmoid(v)
    if name == "silu":
        return v * _sigmoid(v)
    raise ValueError(f"unknown activation {name!r}")


def _sigmoid(v: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    e = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def batch_moments(x: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Per-(ghost batch, channel) mean and biased variance of ``x`` in float64.

    Returns:
        ``(mean, var)``, each float64 of shape ``[G, C]``.
    """
    v = x.astype(np.float64).reshape(geo.groups, geo.outer_per_group, geo.channels, geo.inner)
    mean = v.mean(axis=(1, 3))
    var = np.square(v - mean[:, None, :, None]).mean(axis=(1, 3))
    return mean, var


@register(spec.OP_TYPE)
def fused_norm(
    x: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    axis: int = spec.ATTRIBUTE_DEFAULTS["axis"],
    mode: str = spec.ATTRIBUTE_DEFAULTS["mode"],
    activation: str = spec.ATTRIBUTE_DEFAULTS["activation"],  # noqa: F811 - attribute name
    alpha: float = spec.ATTRIBUTE_DEFAULTS["alpha"],
    epsilon: float = spec.ATTRIBUTE_DEFAULTS["epsilon"],
    virtual_batch_size: int = spec.ATTRIBUTE_DEFAULTS["virtual_batch_size"],
    return_stats: int = spec.ATTRIBUTE_DEFAULTS["return_stats"],
    plugin_namespace: str | None = None,
    plugin_version: str | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run FusedNorm on NumPy arrays.

    Args:
        x: Input of rank >= 2, float32 / float16 / bfloat16 (ml_dtypes).
        scale: ``[C]`` multiplier (gamma in batch_stats mode); cast to float32.
        shift: ``[C]`` offset (beta in batch_stats mode); cast to float32.
        axis: Channel axis; negative values count from the end.
        mode: ``"affine"`` or ``"batch_stats"``.
        activation: One of ``spec.ACTIVATIONS``.
        alpha: Negative slope of ``leaky_relu``.
        epsilon: Variance epsilon (batch_stats).
        virtual_batch_size: Ghost-batch size along axis 0 (batch_stats); 0 = whole batch.
        return_stats: 1 to also return the batch mean and variance (batch_stats).
        plugin_namespace: Ignored (node bookkeeping for TensorRT).
        plugin_version: Ignored (node bookkeeping for TensorRT).

    Returns:
        ``Y`` with the dtype and shape of ``x``; with ``return_stats=1`` the tuple
        ``(Y, batch_mean, batch_var)`` (float32, ``[C]`` or ``[G, C]``).

    Raises:
        PluginError: unsupported dtype, axis out of range, scale/shift not ``[C]``,
            ghost size not dividing the batch, or an invalid attribute.
    """
    x = np.asarray(x)
    scale = np.asarray(scale)
    shift = np.asarray(shift)
    if x.ndim >= 1 and -x.ndim <= int(axis) < 0:
        axis = int(axis) + x.ndim
    attrs = {
        "axis": axis,
        "mode": mode,
        "activation": activation,
        "alpha": alpha,
        "epsilon": epsilon,
        "virtual_batch_size": virtual_batch_size,
        "return_stats": return_stats,
    }
    geo = check_inputs(x.shape, x.dtype, scale.shape, shift.shape, attrs)
    attrs = spec.validate_attributes(attrs)
    # fp32 parameters, as every backend stores them
    s = scale.astype(np.float32).astype(np.float64)
    b = shift.astype(np.float32).astype(np.float64)
    v = x.astype(np.float64).reshape(geo.groups, geo.outer_per_group, geo.channels, geo.inner)
    if attrs["mode"] == "affine":
        z = v * s[None, None, :, None] + b[None, None, :, None]
    else:
        mean, var = batch_moments(x, geo)
        rstd = 1.0 / np.sqrt(var + float(np.float32(attrs["epsilon"])))
        a = s[None, :] * rstd  # [G, C]
        z = (v - mean[:, None, :, None]) * a[:, None, :, None] + b[None, None, :, None]
    y = activation_fn(z, str(attrs["activation"]), float(np.float32(attrs["alpha"])))
    y = y.reshape(x.shape).astype(x.dtype)
    if not attrs["return_stats"]:
        return y
    shape = (geo.channels,) if int(attrs["virtual_batch_size"]) == 0 else (geo.groups, geo.channels)
    return y, mean.astype(np.float32).reshape(shape), var.astype(np.float32).reshape(shape)


# ``fused_norm`` shadows the name ``activation`` with its keyword argument.
activation_fn = activation
