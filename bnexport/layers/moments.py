"""Batch moments: local, masked, and synchronized over ``tf.distribute`` replicas.

All functions take float32 (or float64) tensors and return ``(count, mean, variance)``
with ``keepdims=True`` shapes, so the results broadcast against the input.

* ``count``: number of elements (or the sum of mask weights) that went into each
  statistic; ``0`` for an empty batch or a fully masked channel.
* ``mean = Σx / n`` and the *biased* (population) ``variance = Σ(x − mean)² / n``,
  computed in two passes (never ``E[x²] − E[x]²``). Both are ``0`` where ``n == 0``.

Synchronized moments combine the per-replica triples ``(nᵢ, μᵢ, M2ᵢ)`` (with
``M2ᵢ = Σ(x − μᵢ)²``) with Chan et al.'s parallel algorithm, written in its k-way form::

    N  = Σ nᵢ
    μ  = Σ nᵢ μᵢ / N
    M2 = Σ M2ᵢ + Σ nᵢ (μᵢ − μ)²          variance = M2 / N

Every term is non-negative and the deviations ``μᵢ − μ`` are taken after centering,
so nothing cancels even when ``|μ| ≫ σ`` (where ``E[x²] − E[x]²`` loses every digit).
The sums are two all-reduces (``SUM``); gradients flow through them, and replicas
may hold different numbers of examples (including none).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def _reduced_count(x: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
    """Number of elements reduced over ``axes`` as a scalar of ``x.dtype``."""
    static = [x.shape[a] for a in axes]
    if all(d is not None for d in static):
        n = 1
        for d in static:
            n *= int(d)
        return tf.constant(float(n), dtype=x.dtype)
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(tf.gather(shape, list(axes))), x.dtype)


def local_moments(
    x: tf.Tensor,
    axes: Sequence[int],
    mask: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Count, mean and biased variance of ``x`` over ``axes`` on this replica.

    Args:
        x: float32/float64 tensor of any rank.
        axes: axes to reduce (the non-feature axes).
        mask: optional weights broadcastable to ``x`` (``1`` keeps an element, ``0``
            drops it from the statistics), already cast to ``x.dtype``.

    Returns:
        ``(count, mean, variance)``, each with ``keepdims=True`` shape. ``count`` is a
        scalar without a mask, per-feature with one.
    """
    axes = list(axes)
    if mask is None:
        count = _reduced_count(x, axes)
        mean = tf.math.divide_no_nan(tf.reduce_sum(x, axes, keepdims=True), count)
        # ∂var/∂mean = 0 at the true mean, so the mean's gradient path can be cut here
        # (as tf.nn.moments does) without changing any gradient.
        centered = tf.math.squared_difference(x, tf.stop_gradient(mean))
        variance = tf.math.divide_no_nan(tf.reduce_sum(centered, axes, keepdims=True), count)
        return count, mean, variance
    weights = tf.broadcast_to(mask, tf.shape(x))
    count = tf.reduce_sum(weights, axes, keepdims=True)
    mean = tf.math.divide_no_nan(tf.reduce_sum(x * weights, axes, keepdims=True), count)
    centered = tf.math.squared_difference(x, tf.stop_gradient(mean)) * weights
    variance = tf.math.divide_no_nan(tf.reduce_sum(centered, axes, keepdims=True), count)
    return count, mean, variance


def combine_moments(
    counts: tf.Tensor, means: tf.Tensor, m2s: tf.Tensor, axis: int = 0
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Chan's parallel combination of groups stacked along ``axis``.

    Args:
        counts: ``nᵢ`` per group (broadcastable to ``means``).
        means: ``μᵢ`` per group.
        m2s: ``M2ᵢ = Σ(x − μᵢ)²`` per group.
        axis: the group axis (removed from the results).

    Returns:
        ``(N, μ, M2)`` of the union of the groups (``μ = 0`` where ``N == 0``).
    """
    counts = tf.broadcast_to(counts, tf.shape(means))
    total = tf.reduce_sum(counts, axis)
    mean = tf.math.divide_no_nan(tf.reduce_sum(counts * means, axis), total)
    spread = counts * tf.square(means - tf.expand_dims(mean, axis))
    m2 = tf.reduce_sum(m2s, axis) + tf.reduce_sum(spread, axis)
    return total, mean, m2


def synchronized_moments(
    x: tf.Tensor,
    axes: Sequence[int],
    mask: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Moments of the global batch held by all replicas of the current strategy.

    Outside a replica context (no strategy, or cross-replica context) this is
    :func:`local_moments`. Inside one, each replica contributes ``(nᵢ, μᵢ, M2ᵢ)`` and
    the combination above is computed with two ``SUM`` all-reduces, so every replica
    gets the same ``(N, μ, variance)`` as one device seeing the whole batch.

    Args:
        x: float32/float64 tensor (this replica's shard of the batch).
        axes: axes to reduce.
        mask: optional weights broadcastable to ``x``.

    Returns:
        ``(count, mean, variance)`` of the global batch, ``keepdims=True`` shapes.
    """
    count, mean, variance = local_moments(x, axes, mask)
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return count, mean, variance
    count = tf.broadcast_to(count, tf.shape(mean))
    m2 = variance * count
    # round 1: N and Σ nᵢ μᵢ (one all-reduce on a stacked tensor)
    sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack([count, count * mean]))
    total = sums[0]
    global_mean = tf.math.divide_no_nan(sums[1], total)
    # round 2: M2 = Σ (M2ᵢ + nᵢ (μᵢ − μ)²)
    local_m2 = m2 + count * tf.square(mean - global_mean)
    global_m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_m2)
    return total, global_mean, tf.math.divide_no_nan(global_m2, total)
