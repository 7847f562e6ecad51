"""TensorFlow's fused batch-norm kernel (``FusedBatchNormV3``) behind a small plan.

The fused kernel computes ``y = γ · (x − μ_B)/sqrt(var_B + ε) + β`` for a 4-D NHWC or
NCHW tensor in one pass forward and one backward, with float32 statistics for
float16/bfloat16 inputs. Any input whose normalized axis is a single axis that is
either the last one or axis 1 can be *reshaped* (no copy) to such a 4-D tensor:

* channels last  ``[N, d1, ..., dk, C]`` → ``[N, d1·…·dk, 1, C]``  (NHWC)
* channels first ``[N, C, d1, ..., dk]`` → ``[N, C, d1·…·dk, 1]``  (NCHW)

Ghost batches (virtual batch size ``v``, ``G = N / v`` contiguous groups of ``v``
examples): with a static batch size the batch is split into ``G`` slices (views, no
copy) and the kernel runs once per slice, the outputs being concatenated; with a
dynamic batch size the groups become extra channels ``G·C`` (γ/β tiled ``G`` times),
which costs one transpose each way.

The kernel returns the *unbiased* batch variance; :func:`fused_train` converts it back
to the biased variance every other code path uses (the layer's ``bessel_correction=True``
applies ``n/(n − 1)`` again, on every path alike, for the moving variance).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

# FusedBatchNorm rejects smaller epsilons on cuDNN; refuse them everywhere so the
# layer behaves the same on every device.
MIN_FUSED_EPSILON = 1.001e-5
FUSED_DTYPES = ("float16", "bfloat16", "float32")


def no_groups(groups: tf.Tensor | int) -> bool:
    """True when ``groups`` is the Python int 1 (no ghost batches)."""
    return isinstance(groups, int) and groups == 1


@dataclass(frozen=True)
class FusedPlan:
    """How to feed an input of a given rank to the fused kernel.

    Attributes:
        channels_first: the normalized axis is 1 (NCHW), else the last axis (NHWC).
        rank: input rank (>= 2).
    """

    channels_first: bool
    rank: int

    @property
    def kernel_axes(self) -> list[int]:
        """The axes the kernel reduces in its 4-D layout."""
        return [0, 2, 3] if self.channels_first else [0, 1, 2]

    @property
    def data_format(self) -> str:
        """``"NCHW"`` or ``"NHWC"``."""
        return "NCHW" if self.channels_first else "NHWC"

    def _sizes(self, x: tf.Tensor) -> tuple[tf.Tensor, int, tf.Tensor]:
        """``(N, C, M)``: batch, channels, product of the other dims.

        Explicit sizes let empty tensors reshape (``-1`` is ambiguous for them).
        """
        shape = tf.shape(x)
        if self.channels_first:
            return shape[0], int(x.shape[1]), tf.reduce_prod(shape[2:])
        return shape[0], int(x.shape[-1]), tf.reduce_prod(shape[1:-1])

    def to_4d(self, x: tf.Tensor, groups: tf.Tensor | int = 1, vbs: int = 1) -> tf.Tensor:
        """Reshape (and for ghost batches transpose) ``x`` to the kernel's 4-D layout.

        Args:
            x: input ``[N, ...]``.
            groups: number of ghost batches ``G`` (``1``: none); ``N = G · vbs``,
                ghost batch ``g`` being examples ``g·vbs … (g+1)·vbs − 1``.
            vbs: the virtual batch size (used when ``groups`` is not 1).

        Returns:
            4-D tensor whose channel dimension has ``G·C`` entries (group-major).
        """
        if no_groups(groups) and self.rank == 4:
            return x
        n, c, m = self._sizes(x)
        if no_groups(groups):
            if self.channels_first:
                return tf.reshape(x, [n, c, m, 1])
            return tf.reshape(x, [n, m, 1, c])
        if self.channels_first:  # [G, v, C, M] -> [v, G, C, M] -> [v, G·C, M, 1]
            x = tf.transpose(tf.reshape(x, [groups, vbs, c, m]), [1, 0, 2, 3])
            return tf.reshape(x, [vbs, groups * c, m, 1])
        x = tf.transpose(tf.reshape(x, [groups, vbs, m, c]), [1, 2, 0, 3])  # [v, M, G, C]
        return tf.reshape(x, [vbs, m, 1, groups * c])

    def from_4d(
        self, y: tf.Tensor, like: tf.Tensor, groups: tf.Tensor | int = 1, vbs: int = 1
    ) -> tf.Tensor:
        """Undo :meth:`to_4d`: return ``y`` with the shape and layout of ``like``."""
        if no_groups(groups) and self.rank == 4:
            return y
        if not no_groups(groups):
            _, c, m = self._sizes(like)
            if self.channels_first:
                y = tf.transpose(tf.reshape(y, [vbs, groups, c, m]), [1, 0, 2, 3])
            else:
                y = tf.transpose(tf.reshape(y, [vbs, m, groups, c]), [2, 0, 1, 3])
        return tf.reshape(y, tf.shape(like))


def fused_train(
    x4: tf.Tensor,
    scale: tf.Tensor,
    offset: tf.Tensor,
    epsilon: float,
    data_format: str,
) -> tuple[tf.Tensor, tf.Tensor | float, tf.Tensor, tf.Tensor]:
    """Training-mode fused batch norm.

    Args:
        x4: 4-D input (float16/bfloat16/float32).
        scale: float32 ``[C']``.
        offset: float32 ``[C']``.
        epsilon: variance epsilon.
        data_format: ``"NHWC"`` or ``"NCHW"``.

    Returns:
        ``(y, count, mean, variance)``: ``y`` like ``x4``; float32 ``[C']`` batch mean and
        *biased* variance (zeros for an empty batch); ``count`` the number of elements
        per channel (a Python float when the shape is static, else a scalar tensor).
    """
    empty = tf.zeros([0], tf.float32)
    y, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=scale,
        offset=offset,
        mean=empty,
        variance=empty,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=data_format,
        is_training=True,
    )
    others = [0, 2, 3] if data_format == "NCHW" else [0, 1, 2]
    static = [x4.shape[i] for i in others]
    if all(d is not None for d in static):
        # known shape: the correction is a constant and no guard op is needed
        n = static[0] * static[1] * static[2]
        if n > 1:
            return y, float(n), mean, unbiased * ((n - 1.0) / n)
        return y, float(n), tf.zeros_like(mean), tf.zeros_like(unbiased)
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x4), others)), tf.float32)
    # the kernel's variance carries Bessel's correction n/(n-1); remove it
    correction = tf.math.divide_no_nan(count - 1.0, count)
    variance = tf.where(count > 1.0, unbiased * correction, tf.zeros_like(unbiased))
    mean = tf.where(count > 0.0, mean, tf.zeros_like(mean))
    return y, count, mean, variance


def fused_moments(
    x4: tf.Tensor, epsilon: float, data_format: str
) -> tuple[tf.Tensor | float, tf.Tensor, tf.Tensor]:
    """Batch moments of a 4-D input from one training-mode kernel call (no gradient).

    One kernel (float32 accumulation) is cheaper than the separate reductions of
    :func:`~bnexport.layers.moments.local_moments` (the normalized output it also writes
    is discarded). Used by batch renormalization,
    whose corrections ``r``/``d`` need the moments before the normalizing call.

    Args:
        x4: 4-D input (float16/bfloat16/float32); its gradient is stopped.
        epsilon: variance epsilon (does not affect the moments).
        data_format: ``"NHWC"`` or ``"NCHW"``.

    Returns:
        ``(count, mean, variance)`` as :func:`fused_train` returns them: float32 ``[C']``
        mean and *biased* variance (zeros for an empty batch).
    """
    axis = 1 if data_format == "NCHW" else 3
    channels = x4.shape[axis]  # None for dynamic ghost batches (G·C channels)
    ones = tf.ones([int(channels) if channels is not None else tf.shape(x4)[axis]], tf.float32)
    _, count, mean, variance = fused_train(
        tf.stop_gradient(x4), ones, tf.zeros_like(ones), epsilon, data_format
    )
    return count, mean, variance


def fused_inference(
    x4: tf.Tensor,
    scale: tf.Tensor,
    offset: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    epsilon: float,
    data_format: str,
) -> tf.Tensor:
    """Inference-mode fused batch norm with given statistics (all float32 ``[C]``)."""
    y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=scale,
        offset=offset,
        mean=mean,
        variance=variance,
        epsilon=epsilon,
        data_format=data_format,
        is_training=False,
    )
    return y
