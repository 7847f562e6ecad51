"""Inputs and error bounds shared by the kernel tests (real GPU and CPU emulation)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def make_case(shape, axis, dtype, *, offset, seed=0):
    """``x ~ 2·N(0, 1) + offset`` in ``dtype`` with float32 ``scale``, ``shift`` of length ``C``."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + offset).astype(DTYPES[dtype])
    c = shape[axis]
    return x, rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def stats_atol(x, scale, axis, vbs=0):
    """Extra absolute error of batch_stats in float32: the float32 mean carries up to
    |mean| * 2^-24 of rounding (x - mean is then exact), amplified by |gamma| / sigma
    (per ghost batch of ``vbs`` samples when ``vbs`` > 0)."""
    v = x.astype(np.float64)
    groups = v.shape[0] // vbs if vbs else 1
    v = v.reshape(groups, -1, *v.shape[1:])
    axes = tuple(i for i in range(v.ndim) if i not in (0, axis + 1))
    mean, std = np.abs(v.mean(axis=axes)), v.std(axis=axes)
    return 4 * 2.0**-24 * float(np.max(mean)) * float(np.max(np.abs(scale) / std))
