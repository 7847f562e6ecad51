"""Batch moments: local, masked, and synchronized over ``tf.distribute`` replicas.

All functions take float32 (or float64) tensors and return ``(count, mean, variance)``
with ``keepdims=True`` shapes, so the results broadcast against the input.

* ``count``: number of elements (or the sum of mask weights) that went into each
  statistic; ``0`` for an empty batch or a fully masked channel.
* ``mean`` and the *biased* (population) ``variance = Σ(x − mean)² / n``; both are ``0``
  where ``n == 0``.

**Synchronized moments, on shifted data.** float32 holds a value near ``1e4`` to
``ulp/2 ≈ 5e-4``, so any moment built from a float32 *mean* of such data
(``E[x²] − E[x]²``, or Chan's ``nᵢ(μᵢ − μ)²`` with rounded ``μᵢ``) loses digits in
proportion to ``|μ| / σ``. Each replica instead works on its data shifted by a *pivot*
``Kᵢ`` (its float32 mean ``Σx / n``; a constant for the gradient: any pivot gives the same
value and the same gradient in exact arithmetic)::

    d  = x − Kᵢ                     (exact in float32 when Kᵢ ≈ x, Sterbenz)
    s₁ᵢ = Σ d / nᵢ                  (small: the mean's offset from Kᵢ)
    vᵢ  = Σ d² / nᵢ − s₁ᵢ²           (corrected two-pass; s₁ᵢ² ≪ vᵢ, nothing cancels)

and the replicas are combined with Chan et al.'s parallel formula around a common
pivot. Round one (``SUM`` all-reduce) gives ``N`` and ``P = Σ nᵢ(Kᵢ + s₁ᵢ) / N``
(identical on every replica). Each replica expresses its mean as an offset from ``P``
without ever rounding ``μᵢ`` itself, ``rᵢ = (Kᵢ − P) + s₁ᵢ``, and round two sums
``[nᵢ rᵢ, nᵢ vᵢ + nᵢ rᵢ²]``::

    r  = Σ nᵢ rᵢ / N                mean = P + r
    M2 = Σ (nᵢ vᵢ + nᵢ rᵢ²) − N r²  = Σ M2ᵢ + Σ nᵢ (rᵢ − r)²     variance = M2 / N

``r`` is the pivot's rounding error, so ``N r²`` cancels nothing. The sums (``Σd``,
``Σd²`` and the combination) accumulate in float64, because float32 accumulation alone
errs by about ``√n·ε`` whatever the offset (1e-6 at ``n ≈ 400`` elements per channel):
the global variance of float32 inputs is then float32-exact (relative error ≈ 6e-8,
≤ 1e-6) for means up to ``1e4·σ`` and beyond. The previous form, Chan on rounded
``μᵢ``, erred by 1e-4 at mean 1e4; ``E[x²] − E[x]²`` (Keras 3) loses every digit there.
:func:`local_moments` (one device) uses the same shifted, corrected two-pass form but
accumulates in the input dtype (error ``~√n·ε``, independent of the offset).

Gradients flow through both all-reduces (not through the pivots), replicas may hold
different numbers of examples (including none).
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


def _shifted_moments(
    x: tf.Tensor,
    axes: Sequence[int],
    mask: tf.Tensor | None,
    accumulate: tf.DType | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(n, K, s₁, v)`` of this replica: count, pivot, mean offset, biased variance.

    ``K`` (the mean in ``x.dtype``, gradient stopped) is the pivot; ``mean = K + s₁`` and
    ``v = Σw(x − K)²/n − s₁²``. ``d = x − K`` is formed in ``x.dtype``; the sums of ``d``
    and ``d²`` and the results ``n``, ``s₁``, ``v`` are in ``accumulate`` (default
    ``x.dtype``). ``n`` is a scalar without a mask, per-feature with one.
    """
    axes = list(axes)
    acc = accumulate or x.dtype
    if mask is None:
        count = _reduced_count(x, axes)
        pivot = tf.stop_gradient(
            tf.math.divide_no_nan(tf.reduce_sum(x, axes, keepdims=True), count)
        )
        d = tf.cast(x - pivot, acc)
        count = tf.cast(count, acc)
        s1 = tf.math.divide_no_nan(tf.reduce_sum(d, axes, keepdims=True), count)
        s2 = tf.math.divide_no_nan(tf.reduce_sum(tf.square(d), axes, keepdims=True), count)
    else:
        weights = tf.broadcast_to(mask, tf.shape(x))
        count = tf.reduce_sum(weights, axes, keepdims=True)
        pivot = tf.stop_gradient(
            tf.math.divide_no_nan(tf.reduce_sum(x * weights, axes, keepdims=True), count)
        )
        d = tf.cast(x - pivot, acc)
        weights = tf.cast(weights, acc)
        count = tf.cast(count, acc)
        s1 = tf.math.divide_no_nan(tf.reduce_sum(d * weights, axes, keepdims=True), count)
        s2 = tf.math.divide_no_nan(
            tf.reduce_sum(tf.square(d) * weights, axes, keepdims=True), count
        )
    # s2 >= s1² exactly; rounding may cross 0 only for (near-)constant data
    variance = tf.maximum(s2 - tf.square(s1), 0.0)
    return count, pivot, s1, variance


def local_moments(
    x: tf.Tensor,
    axes: Sequence[int],
    mask: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Count, mean and biased variance of ``x`` over ``axes`` on this replica.

    The corrected two-pass form on data shifted by the float32 mean ``K`` (module
    docstring), accumulated in ``x.dtype``: ``mean = K + s₁``, ``variance = Σd²/n − s₁²``.
    The plain two-pass form ``Σ(x − K)²/n`` is off by ``s₁²`` (the mean's rounding and
    summation error, squared): 1.2e-5 relative at mean ``1e4·σ`` on 1024 elements, where
    this form stays at ~4e-7, as at mean 0 (float32 accumulation, ``~√n·ε``).

    Args:
        x: float32/float64 tensor of any rank.
        axes: axes to reduce (the non-feature axes).
        mask: optional weights broadcastable to ``x`` (``1`` keeps an element, ``0``
            drops it from the statistics), already cast to ``x.dtype``.

    Returns:
        ``(count, mean, variance)``, each with ``keepdims=True`` shape. ``count`` is a
        scalar without a mask, per-feature with one.
    """
    count, pivot, s1, variance = _shifted_moments(x, axes, mask)
    return count, pivot + s1, variance


def bessel_corrected(variance: tf.Tensor, count: tf.Tensor | float) -> tf.Tensor:
    """The unbiased variance ``variance · n/(n − 1)`` from the biased one and its ``n``.

    ``n`` (``count``, broadcastable to ``variance``: a Python number, a scalar or
    per-feature tensor) is the number of values the biased variance was taken over.
    Where ``n <= 1`` the variance is returned as is (0: one value has no spread), as
    TensorFlow's fused kernel does.
    """
    if isinstance(count, (int, float)):
        return variance * (count / (count - 1.0)) if count > 1 else variance
    n = tf.cast(count, variance.dtype)
    factor = tf.where(n > 1.0, n / tf.maximum(n - 1.0, 1.0), tf.ones_like(n))
    return variance * factor


def combine_moments(
    counts: tf.Tensor, means: tf.Tensor, m2s: tf.Tensor, axis: int = 0
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Chan's parallel combination of groups stacked along ``axis``.

    Exact when the group means are exact (float64, or offsets from a common pivot as
    :func:`synchronized_moments` uses); with float32 means far from 0 the rounding of
    ``μᵢ`` limits the result (see the module docstring).

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
    :func:`local_moments`. Inside one, two ``SUM`` all-reduces combine the replicas'
    shifted moments around a common pivot (module docstring), so every replica gets
    the same ``(N, μ, variance)`` as one device seeing the whole batch, to float32
    precision at any offset.

    Args:
        x: float32/float64 tensor (this replica's shard of the batch).
        axes: axes to reduce.
        mask: optional weights broadcastable to ``x``.

    Returns:
        ``(count, mean, variance)`` of the global batch, ``keepdims=True`` shapes.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return local_moments(x, axes, mask)
    # float64 sums: float32 accumulation alone errs by ~√n·ε (1e-6 at n ≈ 400)
    acc = tf.float64
    count, pivot, s1, variance = _shifted_moments(x, axes, mask, acc)
    pivot = tf.cast(pivot, acc)
    count = tf.broadcast_to(count, tf.shape(pivot))
    # round 1: N and the common pivot P (no gradient: any pivot gives the same moments)
    sums = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.stop_gradient(tf.stack([count, count * (pivot + s1)]))
    )
    total = sums[0]
    common = tf.stop_gradient(tf.math.divide_no_nan(sums[1], total))
    # round 2: Σ nᵢ rᵢ and Σ nᵢ (vᵢ + rᵢ²), with rᵢ = (Kᵢ − P) + s₁ᵢ never rounded to μᵢ
    offset = (pivot - common) + s1
    local = tf.stack([count * offset, count * (variance + tf.square(offset))])
    sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)
    r = tf.math.divide_no_nan(sums[0], total)
    global_variance = tf.maximum(tf.math.divide_no_nan(sums[1], total) - tf.square(r), 0.0)
    return tuple(tf.cast(t, x.dtype) for t in (total, common + r, global_variance))
