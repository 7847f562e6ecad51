"""Independent NumPy (float64) reference for bnexport.BatchNormalization.

Written from the formulas, not from the layer's code:

* training: ``y = γ · (x̂ · r + d) · a_s + a_b·γ + β`` with ``x̂ = (x − μ_B)/sqrt(var_B + ε)``,
  ``r = 1, d = 0`` without renorm, ``(a_s, a_b) = (1, 0)`` without adjustment;
  ghost batches are the contiguous groups of ``v`` examples.
* EMA: ``m ← m·momentum + b·(1 − momentum)``; renorm tracks stddevs (legacy tf.keras).
* gradients of ``L = Σ y·w`` for the plain/renorm/ghost paths, closed form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RefBN:
    """State and math of one batch-normalization layer in float64."""

    axes: list[int]  # normalized feature axes
    rank: int
    momentum: float = 0.99
    epsilon: float = 1e-3
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    moving_mean: np.ndarray | None = None
    moving_variance: np.ndarray | None = None
    renorm: bool = False
    renorm_clipping: dict = field(default_factory=dict)
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    renorm_mean: np.ndarray | None = None
    renorm_stddev: np.ndarray | None = None
    moving_stddev: np.ndarray | None = None

    # -- shapes -------------------------------------------------------------
    def bshape(self, ghost: bool = False) -> list[int]:
        shape = [1] * self.rank
        for a, d in zip(self.axes, self.param_shape, strict=True):
            shape[a] = d
        return [1, 1, *shape[1:]] if ghost else shape

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.moving_mean))

    def red_axes(self, ghost: bool = False) -> tuple[int, ...]:
        axes = [i for i in range(self.rank) if i not in self.axes]
        if ghost:
            axes = [1] + [a + 1 for a in axes if a != 0]
        return tuple(axes)

    def _b(self, v: np.ndarray | None, ghost: bool = False) -> np.ndarray | float | None:
        return None if v is None else np.reshape(v, self.bshape(ghost))

    def _ghost(self, x: np.ndarray) -> np.ndarray:
        v = self.virtual_batch_size
        return x.reshape(x.shape[0] // v, v, *x.shape[1:])

    # -- forward ------------------------------------------------------------
    def moments(self, x: np.ndarray, mask: np.ndarray | None = None):
        """(x_used, mean, var, weights) in the (possibly ghost) layout, keepdims."""
        x = np.asarray(x, np.float64)
        ghost = self.virtual_batch_size is not None
        w = None
        if mask is not None:
            w = np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
        if ghost:
            x = self._ghost(x)
            w = None if w is None else self._ghost(w)
        axes = self.red_axes(ghost)
        if w is None:
            mean = x.mean(axis=axes, keepdims=True)
            var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        else:
            n = w.sum(axis=axes, keepdims=True)
            mean = np.where(n > 0, (x * w).sum(axis=axes, keepdims=True) / np.maximum(n, 1), 0)
            var = np.where(
                n > 0, ((x - mean) ** 2 * w).sum(axis=axes, keepdims=True) / np.maximum(n, 1), 0
            )
        return x, mean, var

    def batch_stats(self, mean: np.ndarray, var: np.ndarray):
        """Parameter-shaped statistics used for EMA and renorm (ghost: group average)."""
        if self.virtual_batch_size is not None:
            mean, var = mean.mean(axis=0), var.mean(axis=0)
        return mean.reshape(self.param_shape), var.reshape(self.param_shape)

    def renorm_rd(self, bmean: np.ndarray, bvar: np.ndarray):
        std = np.sqrt(bvar + self.epsilon)
        rstd = np.maximum(self.renorm_stddev, np.sqrt(self.epsilon))
        r = std / rstd
        d = (bmean - self.renorm_mean) / rstd
        c = self.renorm_clipping
        if "rmin" in c:
            r = np.maximum(r, c["rmin"])
        if "rmax" in c:
            r = np.minimum(r, c["rmax"])
        if "dmax" in c:
            d = np.clip(d, -c["dmax"], c["dmax"])
        return r, d

    def train(self, x, mask=None, adjustment=None, update=True):
        """Training-mode output (float64, input shape); updates the state if ``update``."""
        x0 = np.asarray(x, np.float64)
        ghost = self.virtual_batch_size is not None
        xg, mean, var = self.moments(x0, mask)
        xhat = (xg - mean) / np.sqrt(var + self.epsilon)
        bmean, bvar = self.batch_stats(mean, var)
        if self.renorm:
            r, d = self.renorm_rd(bmean, bvar)
            xhat = xhat * self._b(r, ghost) + self._b(d, ghost)
        if adjustment is not None:
            a_s, a_b = adjustment
            xhat = xhat * a_s + a_b
        y = xhat
        if self.gamma is not None:
            y = y * self._b(self.gamma, ghost)
        if self.beta is not None:
            y = y + self._b(self.beta, ghost)
        if update and x0.size:
            self.update(bmean, bvar)
        return y.reshape(x0.shape)

    def update(self, bmean: np.ndarray, bvar: np.ndarray) -> None:
        m = self.momentum
        self.moving_mean = self.moving_mean * m + bmean * (1 - m)
        if not self.renorm:
            self.moving_variance = self.moving_variance * m + bvar * (1 - m)
            return
        std = np.sqrt(bvar + self.epsilon)
        rm = self.renorm_momentum
        self.renorm_mean = self.renorm_mean * rm + bmean * (1 - rm)
        self.renorm_stddev = self.renorm_stddev * rm + std * (1 - rm)
        self.moving_stddev = self.moving_stddev * m + std * (1 - m)
        self.moving_variance = np.maximum(self.moving_stddev**2 - self.epsilon, 0)

    def infer(self, x):
        x = np.asarray(x, np.float64)
        y = (x - self._b(self.moving_mean)) / np.sqrt(self._b(self.moving_variance) + self.epsilon)
        if self.gamma is not None:
            y = y * self._b(self.gamma)
        if self.beta is not None:
            y = y + self._b(self.beta)
        return y

    # -- gradients ----------------------------------------------------------
    def train_grads(self, x, dy):
        """Gradients of ``Σ y·dy`` w.r.t. (x, γ, β) in training mode (state before the step).

        With ``x̂ = (x − μ)/σ`` per group and ``g = γ·r`` (r, d stop-gradient)::

            dβ = Σ dy,  dγ = Σ dy·(x̂·r + d)
            dx = g/σ · (dy − mean(dy) − x̂ · mean(dy·x̂))
        """
        x0 = np.asarray(x, np.float64)
        ghost = self.virtual_batch_size is not None
        xg, mean, var = self.moments(x0)
        dy = np.asarray(dy, np.float64)
        dyg = self._ghost(dy) if ghost else dy
        axes = self.red_axes(ghost)
        sigma = np.sqrt(var + self.epsilon)
        xhat = (xg - mean) / sigma
        bmean, bvar = self.batch_stats(mean, var)
        r = np.ones(self.param_shape)
        d = np.zeros(self.param_shape)
        if self.renorm:
            r, d = self.renorm_rd(bmean, bvar)
        gamma = np.ones(self.param_shape) if self.gamma is None else self.gamma
        g = self._b(gamma * r, ghost)
        dx = (
            g
            / sigma
            * (
                dyg
                - dyg.mean(axis=axes, keepdims=True)
                - xhat * (dyg * xhat).mean(axis=axes, keepdims=True)
            )
        )
        all_axes = tuple(i for i in range(xg.ndim) if i not in [a + ghost for a in self.axes])
        z = xhat * self._b(r, ghost) + self._b(d, ghost)
        dgamma = (dyg * z).sum(axis=all_axes).reshape(self.param_shape)
        dbeta = dyg.sum(axis=all_axes).reshape(self.param_shape)
        return dx.reshape(x0.shape), dgamma, dbeta


def randomize(layer, seed: int = 0) -> None:
    """Give a built layer non-trivial γ, β and statistics (so tests can fail)."""
    rng = np.random.default_rng(seed)
    shape = tuple(layer.moving_mean.shape)
    if layer.gamma is not None:
        layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
    if layer.beta is not None:
        layer.beta.assign(rng.normal(0, 0.5, shape))
    layer.moving_mean.assign(rng.normal(0, 1, shape))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    if layer.renorm:
        layer.moving_stddev.assign(np.sqrt(layer.moving_variance.numpy() + layer.epsilon))
        layer.renorm_mean.assign(rng.normal(0, 1, shape))
        layer.renorm_stddev.assign(rng.uniform(0.7, 1.5, shape))


def make_reference(layer, **overrides) -> RefBN:
    """A :class:`RefBN` holding a copy of a built layer's configuration and variables."""

    def val(v):
        return None if v is None else np.array(v.numpy(), np.float64)

    ref = RefBN(
        axes=list(layer.axis),
        rank=layer._rank,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        gamma=val(layer.gamma),
        beta=val(layer.beta),
        moving_mean=val(layer.moving_mean),
        moving_variance=val(layer.moving_variance),
        renorm=layer.renorm,
        renorm_clipping=dict(layer.renorm_clipping),
        renorm_momentum=layer.renorm_momentum,
        virtual_batch_size=layer.virtual_batch_size,
    )
    if layer.renorm:
        ref.renorm_mean = val(layer.renorm_mean)
        ref.renorm_stddev = val(layer.renorm_stddev)
        ref.moving_stddev = val(layer.moving_stddev)
    for k, v in overrides.items():
        setattr(ref, k, v)
    return ref
