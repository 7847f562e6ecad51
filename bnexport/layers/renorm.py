"""Batch renormalization (Ioffe, 2017) with the legacy ``tf.keras`` semantics.

During training the batch-normalized value ``x̂ = (x − μ_B) / σ_B`` is corrected to
``x̂ · r + d`` with::

    σ_B = sqrt(var_B + ε)
    r   = clip(σ_B / max(σ_R, sqrt(ε)), rmin, rmax)      (stop-gradient)
    d   = clip((μ_B − μ_R) / max(σ_R, sqrt(ε)), −dmax, dmax)   (stop-gradient)

where ``μ_R`` / ``σ_R`` are the ``renorm_mean`` / ``renorm_stddev`` variables taken
*before* this step's update. Afterwards (training steps only)::

    μ_R ← μ_R · renorm_momentum + μ_B · (1 − renorm_momentum)
    σ_R ← σ_R · renorm_momentum + σ_B · (1 − renorm_momentum)
    moving_mean   ← moving_mean · momentum + μ_B · (1 − momentum)
    moving_stddev ← moving_stddev · momentum + σ_B · (1 − momentum)
    moving_variance = max(moving_stddev² − ε, 0)

Inference is the same as without renorm (moving mean/variance).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import tensorflow as tf

from bnexport.errors import LayerConfigError

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def validate_renorm_clipping(renorm_clipping: Any) -> dict[str, float]:
    """Check a ``renorm_clipping`` dict and return it with float values.

    Args:
        renorm_clipping: ``None`` or a dict with optional keys ``rmax``, ``rmin``, ``dmax``.

    Returns:
        A new dict with the same keys and float values (``None`` values dropped).

    Raises:
        LayerConfigError: (a ``ValueError``) not a dict, unknown keys, non-numeric or
            NaN values, ``rmin > rmax``, ``rmin < 0`` or ``dmax < 0``. The messages
            start with Keras 3's wording (``"Received invalid keys for
            `renorm_clipping` argument"``, ``"rmax should be greater than rmin"``,
            ``"dmax should be non-negative"``), so code written against Keras 3 that
            catches ``ValueError`` and matches the message keeps working.
    """
    if renorm_clipping is None:
        return {}
    if not isinstance(renorm_clipping, dict):
        raise LayerConfigError(
            f"`renorm_clipping` must be a dict with keys {list(RENORM_CLIPPING_KEYS)}. "
            f"Received: renorm_clipping={renorm_clipping!r}"
        )
    unknown = sorted(set(renorm_clipping) - set(RENORM_CLIPPING_KEYS), key=str)
    if unknown:
        # Keras 3's wording first (callers match it), then which key and a suggestion
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), RENORM_CLIPPING_KEYS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise LayerConfigError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{renorm_clipping}. Supported values: {list(RENORM_CLIPPING_KEYS)}. "
            f"Unknown: {', '.join(hints)}."
        )
    clipping: dict[str, float] = {}
    for key, value in renorm_clipping.items():
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LayerConfigError(
                f"`renorm_clipping[{key!r}]` must be a number. Received: {key}={value!r}"
            ) from None
        if math.isnan(number):
            raise LayerConfigError(f"`renorm_clipping[{key!r}]` is NaN. Received: {key}={value!r}")
        clipping[key] = number
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None and rmax is not None and rmin > rmax:
        raise LayerConfigError(
            "rmax should be greater than rmin in the `renorm_clipping` argument "
            f"(rmin <= rmax). Received: rmax={rmax}, rmin={rmin}."
        )
    if rmin is not None and rmin < 0:
        raise LayerConfigError(
            f"rmin should be non-negative in the `renorm_clipping` argument. Received: rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise LayerConfigError(
            f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return clipping


def renorm_correction(
    mean: tf.Tensor,
    variance: tf.Tensor,
    renorm_mean: tf.Tensor,
    renorm_stddev: tf.Tensor,
    epsilon: float,
    clipping: dict[str, float],
) -> tuple[tf.Tensor, tf.Tensor]:
    """The clipped, stop-gradient corrections ``(r, d)``; all tensors shaped ``[C...]``.

    Args:
        mean: batch mean ``μ_B``.
        variance: biased batch variance ``var_B``.
        renorm_mean: ``μ_R`` before this step's update.
        renorm_stddev: ``σ_R`` before this step's update.
        epsilon: the layer's ε.
        clipping: validated ``renorm_clipping``.

    Returns:
        ``(r, d)`` with gradients stopped.
    """
    stddev = tf.sqrt(variance + epsilon)
    floor = tf.sqrt(tf.constant(epsilon, dtype=stddev.dtype))
    renorm_stddev = tf.maximum(renorm_stddev, floor)
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if "rmin" in clipping:
        r = tf.maximum(r, clipping["rmin"])
    if "rmax" in clipping:
        r = tf.minimum(r, clipping["rmax"])
    if "dmax" in clipping:
        d = tf.clip_by_value(d, -clipping["dmax"], clipping["dmax"])
    return tf.stop_gradient(r), tf.stop_gradient(d)
