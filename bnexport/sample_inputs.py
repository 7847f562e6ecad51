"""Seeded sample inputs for a model whose inputs are described by name, shape and dtype.

The one generator behind the exporter's verification and the parity checker (both run
the reference and the candidate on these when the user gives no data):

* the first dimension, when dynamic (``None``), is ``batch``; static dimensions stay;
* other dynamic dimensions become ``fill_dynamic``, or are refused (:class:`UsageError`
  asking for real inputs) when ``fill_dynamic`` is ``None``;
* float inputs of rank 4 are treated as images: uniform in ``[-1, 1)``, the range
  Keras applications' ``preprocess_input`` produces; other float inputs are standard
  normal; integer inputs are uniform in ``[0, 10)``; booleans are fair coin flips.

Values are drawn from ``numpy.random.default_rng(seed)`` in input order, so a given
``(inputs, batch, seed)`` always gives the same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bnexport.errors import UsageError

#: TensorFlow dtype names that NumPy spells differently; generated as float32 and cast
#: by the caller to what its graph reads
_TF_NAMES = {"float": "float32", "half": "float32", "double": "float64"}


def _numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str):
        return np.dtype(_TF_NAMES.get(dtype, dtype))
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _describe(info: Any) -> str:
    describe = getattr(info, "describe", None)
    return describe() if callable(describe) else repr(getattr(info, "name", info))


def make_inputs(
    inputs: Sequence[Any],
    batch: int,
    seed: int = 0,
    *,
    fill_dynamic: int | None = None,
) -> dict[str, np.ndarray]:
    """``{name: array}`` for ``inputs`` (objects with ``name``, ``shape``, ``dtype``).

    Args:
        inputs: the model inputs, in order (``bnexport.runtime.io_check.TensorInfo``,
            ``bnexport.export.loaders.TensorInfo`` or alike; ``shape`` entries ``None``
            where dynamic; ``dtype`` a NumPy dtype or name).
        batch: size of a dynamic first dimension (the batch), >= 1.
        seed: seed of the generator.
        fill_dynamic: size of the other dynamic dimensions; ``None`` refuses them.

    Raises:
        UsageError: ``batch < 1``, an input without a shape, or a dynamic non-batch
            dimension with ``fill_dynamic=None`` (names the input).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UsageError(f"the number of samples must be an int >= 1. Received: {batch!r}")
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.shape is None:
            raise UsageError(
                f"input {_describe(info)} has no shape in the graph; pass real inputs "
                "(--inputs data.npz)"
            )
        shape = list(info.shape)
        if shape and shape[0] is None:
            shape[0] = batch
        if any(d is None for d in shape[1:]):
            if fill_dynamic is None:
                raise UsageError(
                    f"input {_describe(info)} has dynamic dimensions besides the batch; "
                    "pass real inputs (--inputs data.npz)"
                )
            shape = [fill_dynamic if d is None else int(d) for d in shape]
        dtype = _numpy_dtype(info.dtype)
        if dtype.kind == "f":
            if len(shape) == 4:
                value = rng.uniform(-1.0, 1.0, size=shape)
            else:
                value = rng.standard_normal(size=shape)
        elif dtype.kind == "b":
            value = rng.random(size=shape) > 0.5
        else:
            value = rng.integers(0, 10, size=shape)
        feed[info.name] = np.asarray(value).astype(dtype)
    return feed
