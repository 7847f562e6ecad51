"""Input description and validation shared by every runtime backend.

A model's inputs and outputs are described by :class:`TensorInfo` (name, NumPy
dtype, shape with ``None`` for a dynamic dimension). :func:`check_inputs` turns
what a caller passed to ``Session.run`` into the exact feed a backend needs, or
raises :class:`~bnexport.errors.InputError` naming the input and what the model
expects.

Casting rule (applied per input, nothing else is converted silently):

- same dtype: passed through (made C-contiguous if needed);
- floating -> floating (e.g. NumPy's default float64 -> float32): cast. The
  values are rounded to the model's precision, which is what the model computes
  in anyway;
- bool/integer -> floating or integer -> integer: cast only when NumPy calls the
  cast ``safe`` (uint8 images -> float32, int32 -> int64), or, for integer ->
  integer, when every value fits the target type (int64 token ids -> int32);
- everything else (floating -> integer, complex, strings, object arrays) is
  refused with an ``InputError``.

With ``cast=False`` (the server: a KServe/Triton request names its datatype,
and a datatype that differs from the model's is the client's mistake, as in
Triton) nothing is converted: the dtype must be the model's, except that a
string input accepts an object array of ``bytes``/``str``. This module is the
one input validator of the project: ``Session.run`` and the server's
:meth:`~bnexport.serve.core.repository.ServedModel.check_inputs` both call
:func:`check_inputs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.errors import InputError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one model input or output.

    Attributes:
        name: tensor name in the graph.
        dtype: NumPy dtype the backend reads or returns.
        shape: one entry per dimension; ``None`` for a dynamic dimension. The whole
            shape is ``None`` when the graph does not state the rank.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        """Human-readable ``name: dtype[d0, d1, ...]`` with ``?`` for dynamic dims."""
        if self.shape is None:
            return f"{self.name}: {np.dtype(self.dtype).name}[unknown rank]"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


def tensor_infos_from_onnx(value_infos: Sequence[Any]) -> list[TensorInfo]:
    """Build ``TensorInfo`` objects from ONNX ``ValueInfoProto`` entries.

    Dimensions given by a ``dim_param`` (or absent) become ``None``; a value
    without a shape gets ``shape=None`` (rank unknown, not checked).
    """
    from onnx import helper

    infos = []
    for vi in value_infos:
        ttype = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        if ttype.HasField("shape"):
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") else None for d in ttype.shape.dim
            )
        else:
            shape = None
        infos.append(TensorInfo(vi.name, dtype, shape))
    return infos


def _cast(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast ``arr`` to ``dtype`` following the module's casting rule."""
    src = arr.dtype
    if src == dtype:
        return np.ascontiguousarray(arr)
    src_kind, dst_kind = src.kind, dtype.kind
    if src_kind == "f" and dst_kind == "f":
        return np.ascontiguousarray(arr, dtype=dtype)
    if src_kind in "biu" and dst_kind in "fiu" and np.can_cast(src, dtype, "safe"):
        return np.ascontiguousarray(arr, dtype=dtype)
    if src_kind in "iu" and dst_kind in "iu":
        info = np.iinfo(dtype)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return np.ascontiguousarray(arr, dtype=dtype)
        raise InputError(
            f"input {name!r}: values in [{arr.min()}, {arr.max()}] do not fit the model's "
            f"{dtype.name} (received {src.name})"
        )
    raise InputError(
        f"input {name!r}: the model expects {dtype.name}, received {src.name}; "
        "only float->float and value-preserving integer casts are applied automatically"
    )


def _exact(name: str, arr: np.ndarray, info: TensorInfo) -> np.ndarray:
    """``arr`` unchanged when its dtype is the model's (``cast=False``), else ``InputError``."""
    want = np.dtype(info.dtype)
    if arr.dtype == want or (want.kind in "SUO" and arr.dtype.kind in "SUO"):
        return arr
    raise InputError(
        f"input {name!r}: the model expects {want.name} ({info.describe()}), "
        f"received {arr.dtype.name}; no conversion is applied"
    )


def check_inputs(
    inputs: Mapping[str, Any] | np.ndarray | Any,
    expected: Sequence[TensorInfo],
    *,
    cast: bool = True,
) -> dict[str, np.ndarray]:
    """Validate and convert ``inputs`` against the model's ``expected`` inputs.

    Args:
        inputs: a mapping ``{input name: array-like}``, or a single array-like
            when the model has exactly one input.
        expected: the model's inputs.
        cast: apply the module's casting rule (``Session.run``); ``False``: the
            dtype must already be the model's and arrays are returned as given
            (the server, whose requests state their datatype).

    Returns:
        ``{name: C-contiguous np.ndarray of the expected dtype}`` in model order.

    Raises:
        InputError: unknown or missing names, a wrong rank, a static dimension
            that differs, or a dtype that the casting rule refuses. The message
            names the input and shows what the model expects.
    """
    by_name = {info.name: info for info in expected}
    if not isinstance(inputs, Mapping):
        if len(expected) != 1:
            names = ", ".join(repr(i.name) for i in expected)
            raise InputError(
                f"the model has {len(expected)} inputs ({names}); pass a dict {{name: array}}"
            )
        inputs = {expected[0].name: inputs}
    unknown = [k for k in inputs if k not in by_name]
    if unknown:
        raise InputError(
            f"unknown input(s) {unknown}; the model expects "
            + "; ".join(i.describe() for i in expected)
        )
    missing = [i for i in expected if i.name not in inputs]
    if missing:
        raise InputError("missing input(s): " + "; ".join(i.describe() for i in missing))
    feed: dict[str, np.ndarray] = {}
    for info in expected:
        value = inputs[info.name]
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if cast and (arr.dtype == object or arr.dtype.kind not in "biuf"):
            raise InputError(
                f"input {info.name!r}: expected a numeric array ({info.describe()}), "
                f"received dtype {arr.dtype}"
            )
        if info.shape is None:
            feed[info.name] = _convert(arr, info, cast)
            continue
        if arr.ndim != len(info.shape):
            raise InputError(
                f"input {info.name!r}: expected rank {len(info.shape)} ({info.describe()}), "
                f"received shape {tuple(arr.shape)}"
            )
        for axis, (want, got) in enumerate(zip(info.shape, arr.shape, strict=True)):
            if want is not None and want != got:
                raise InputError(
                    f"input {info.name!r}: dimension {axis} must be {want} "
                    f"({info.describe()}), received shape {tuple(arr.shape)}"
                )
        feed[info.name] = _convert(arr, info, cast)
    return feed


def _convert(arr: np.ndarray, info: TensorInfo, cast: bool) -> np.ndarray:
    return _cast(info.name, arr, np.dtype(info.dtype)) if cast else _exact(info.name, arr, info)


def batch_size(feed: Mapping[str, np.ndarray]) -> int | None:
    """The common leading dimension of every input, or ``None`` if they disagree or are scalars."""
    sizes = {arr.shape[0] for arr in feed.values() if arr.ndim > 0}
    if len(sizes) != 1 or any(arr.ndim == 0 for arr in feed.values()):
        return None
    return sizes.pop()


def split_batches(feed: Mapping[str, np.ndarray], max_batch: int) -> list[dict[str, np.ndarray]]:
    """Split every input along axis 0 into chunks of at most ``max_batch`` samples.

    Raises:
        InputError: the inputs do not share one batch size, so they cannot be split.
    """
    n = batch_size(feed)
    if n is None:
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        raise InputError(
            f"cannot split into batches of max_batch={max_batch}: the inputs do not share "
            f"one leading (batch) dimension: {shapes}"
        )
    return [
        {k: v[start : start + max_batch] for k, v in feed.items()}
        for start in range(0, n, max_batch)
    ]
