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


def _channel_index(
    shape: tuple[int, ...], *, axis: int, other_axis: int | None, groups: int
) -> np.ndarray:
    """Per-element channel index of a weight whose channel is split across a group.

    The channel that weight element ``w[..., a=j, ..., b=i, ...]`` touches is ``j`` for
    ``groups == 1``; for a grouped weight the group number comes from ``other_axis`` (``b``):
    ``channel = (i // (shape[b] / groups)) * shape[a] + j``.  The result broadcasts
    against ``shape`` (size 1 on every axis but ``axis`` and, when grouped, ``other_axis``).
    """
    rank = len(shape)
    index = np.arange(shape[axis]).reshape([-1 if d == axis else 1 for d in range(rank)])
    if groups == 1 or other_axis is None:
        return index
    per_group_other = shape[other_axis] // groups
    group_of = np.arange(shape[other_axis]) // per_group_other
    group_of = group_of.reshape([-1 if d == other_axis else 1 for d in range(rank)])
    return group_of * shape[axis] + index


def fold_into_producer_weights(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    out_axis: int,
    groups: int = 1,
    in_axis: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``y = z · scale + shift`` into the linear op ``z = W ⊛ x + B`` that produces ``z``.

    ``W'[.., o, ..] = W[.., o, ..] · scale[o]`` and ``B' = B · scale + shift``.

    Args:
        weight: the producer's weight; its output channel lies along ``out_axis``
            (Conv ``[M, C/g, k…]``: 0; Gemm ``B`` ``[K, N]``: 1, transposed: 0).
        bias: ``[C_out]`` bias, or ``None`` (treated as zeros).
        scale: ``[C_out]`` float64 scale.
        shift: ``[C_out]`` float64 shift.
        out_axis: weight axis holding the output channel (within its group).
        groups: for ConvTranspose (``[C_in, C_out/g, k…]``) the group count; output channel
            ``o = (i // (C_in/g)) · (C_out/g) + j`` for ``W[i, j, …]``.
        in_axis: weight axis holding the input channel (needed only when ``groups > 1``).

    Returns:
        ``(W', B')`` in float64; ``B'`` has shape ``[C_out]``.
    """
    w64 = np.asarray(weight, np.float64)
    scale = np.asarray(scale, np.float64).reshape(-1)
    shift = np.asarray(shift, np.float64).reshape(-1)
    index = _channel_index(w64.shape, axis=out_axis, other_axis=in_axis, groups=groups)
    b64 = np.zeros_like(shift) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return w64 * scale[index], b64 * scale + shift


def fold_into_consumer_weights(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    in_axis: int,
    out_axis: int,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``x' = x · scale + shift`` into the linear op ``y = W ⊛ x' + B`` that consumes it.

    ``W'[o, i, k] = W[o, i, k] · scale[c(o, i)]`` and
    ``B'[o] = B[o] + Σ_{i,k} W[o, i, k] · shift[c(o, i)]`` where ``c(o, i) = i`` for
    ``groups == 1`` and ``(o // (C_out/g)) · (C_in/g) + i`` for a grouped convolution.
    This is exact only when every input element that reaches ``W`` went through the affine
    map — i.e. no zero padding (a padded zero would have become ``shift``).

    Args:
        weight: the consumer's weight (Conv ``[M, C/g, k…]``: in_axis 1, out_axis 0;
            Gemm/MatMul ``[K, N]``: in_axis 0, out_axis 1).
        bias: ``[C_out]`` bias or ``None`` (zeros).
        scale: ``[C_in]`` float64 scale.
        shift: ``[C_in]`` float64 shift.
        in_axis: weight axis of the input channel (within its group).
        out_axis: weight axis of the output channel.
        groups: convolution groups.

    Returns:
        ``(W', B')`` in float64; ``B'`` has shape ``[C_out]``.
    """
    w64 = np.asarray(weight, np.float64)
    scale = np.asarray(scale, np.float64).reshape(-1)
    shift = np.asarray(shift, np.float64).reshape(-1)
    index = _channel_index(w64.shape, axis=in_axis, other_axis=out_axis, groups=groups)
    reduce_axes = tuple(d for d in range(w64.ndim) if d != out_axis)
    added = (w64 * shift[index]).sum(axis=reduce_axes)
    b64 = np.zeros(w64.shape[out_axis]) if bias is None else np.asarray(bias, np.float64)
    return w64 * scale[index], b64.reshape(-1) + added
