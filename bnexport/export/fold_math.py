"""The batch-normalization folding math, in one place.

Inference-mode batch normalization over channel ``c`` is an affine map::

    y = γ · (x − μ) / σ + β,   σ = sqrt(var + ε)
      = x · scale + shift,     scale = γ / σ,   shift = β − μ · scale

Folding it *forward* into a preceding linear op ``z = W ⊛ x + B`` whose output
channel is ``c`` gives ``W' = W · scale[c]`` (each output-channel slice of ``W``)
and ``B' = (B − μ) · γ/σ + β = B · scale + shift``.

All of this is computed in float64 and only then cast to the graph's dtype, so
that folding never loses more precision than the final cast does.
"""

from __future__ import annotations

import numpy as np

from bnexport.errors import ExportError


def bn_scale_shift(
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
    *,
    name: str = "batch_norm",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` of an inference-mode batch normalization.

    Args:
        gamma: ``[C]`` scale (γ), or ``None`` when the layer has ``scale=False``.
        beta: ``[C]`` offset (β), or ``None`` when the layer has ``center=False``.
        mean: ``[C]`` moving mean (μ).
        var: ``[C]`` moving variance.
        epsilon: variance epsilon (ε).
        name: layer or node name, used in error messages.

    Returns:
        ``scale = γ / sqrt(var + ε)`` and ``shift = β − μ · scale``, both float64 ``[C]``.

    Raises:
        ExportError: a statistic is NaN/Inf, the variance is negative, or shapes disagree.
    """
    mean64 = np.asarray(mean, dtype=np.float64).reshape(-1)
    var64 = np.asarray(var, dtype=np.float64).reshape(-1)
    channels = mean64.shape[0]
    gamma64 = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64).reshape(-1)
    beta64 = np.zeros(channels) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    for field, value in (("gamma", gamma64), ("beta", beta64), ("moving_variance", var64)):
        if value.shape != (channels,):
            raise ExportError(
                f"{name}: {field} has shape {value.shape}, expected ({channels},) like moving_mean"
            )
    for field, value in (
        ("gamma", gamma64),
        ("beta", beta64),
        ("moving_mean", mean64),
        ("moving_variance", var64),
    ):
        bad = ~np.isfinite(value)
        if bad.any():
            raise ExportError(
                f"{name}: {field} has {int(bad.sum())} non-finite value(s) "
                f"(first at channel {int(np.argmax(bad))})"
            )
    if (var64 < 0).any():
        idx = int(np.argmax(var64 < 0))
        raise ExportError(
            f"{name}: moving_variance is negative at channel {idx} ({var64[idx]:.6g})"
        )
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ExportError(f"{name}: epsilon must be finite and >= 0. Received: epsilon={epsilon}")
    denom = np.sqrt(var64 + float(epsilon))
    if (denom == 0).any():
        raise ExportError(
            f"{name}: variance + epsilon is 0 at channel {int(np.argmax(denom == 0))}"
        )
    scale = gamma64 / denom
    shift = beta64 - mean64 * scale
    return scale, shift
