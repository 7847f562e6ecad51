"""Calibration data: accept, validate and replay it for onnxruntime's calibrators.

Accepted forms (``calibration`` argument of :func:`bnexport.quantize`):

- one array ``[N, ...]`` — a model with exactly one input;
- a dict ``{input name: array [N, ...]}`` — any model (every input named, same ``N``);
- an iterable (list, generator) of such arrays or dicts — one entry per batch;
- on the CLI, ``.npy`` files (single-input models) and ``.npz`` archives (one array per
  input name; a single-input model also accepts one unnamed array), read by
  :func:`bnexport.io.arrays.load_arrays` with ``allow_pickle=False`` (a file never runs code).

Every batch is checked with the project's one input validator,
:func:`bnexport.runtime.io_check.check_inputs` (names, rank, static dimensions, the same
casting rule as ``Session.run``), then for NaN/Inf. A mistake raises
:class:`~bnexport.errors.CalibrationError` naming the input and the batch before anything
is computed or written. Arrays larger than ``batch_size`` samples are split along axis 0,
so the calibrators' intermediate outputs stay bounded; a model with a static batch
dimension ``b`` gets batches of exactly ``b``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.errors import CalibrationError, InputError

#: calibration batch size when the model's batch dimension is dynamic
DEFAULT_BATCH = 16


@dataclasses.dataclass
class CalibrationSet:
    """Validated calibration batches, ready to feed an onnxruntime session.

    Attributes:
        batches: ``[{input name: C-contiguous array of the model's dtype}]``.
        inputs: the model inputs, in graph order.
    """

    batches: list[dict[str, np.ndarray]]
    inputs: list[str]

    @property
    def num_samples(self) -> int:
        """Samples over all batches (leading dimension of the first input)."""
        first = self.inputs[0]
        return sum(int(b[first].shape[0]) if b[first].ndim else 1 for b in self.batches)

    def reader(self) -> Any:
        """A fresh ``onnxruntime.quantization.CalibrationDataReader`` over the batches."""
        return _Reader(self.batches)

    def concatenated(self) -> dict[str, np.ndarray]:
        """All batches joined along axis 0 (one feed per input)."""
        return {
            name: np.concatenate([b[name] for b in self.batches], axis=0) for name in self.inputs
        }


class _Reader:
    """Replays the batches once (``get_next`` returns ``None`` at the end).

    Duck-types ``onnxruntime.quantization.CalibrationDataReader`` (whose
    ``__subclasshook__`` accepts any class with ``get_next``), so this module does not
    import onnxruntime.
    """

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._batches = list(batches)
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self._batches[start_index:end_index])

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def _raw_batches(calibration: Any) -> list[Any]:
    """Split the accepted forms into a list of raw batches (array or mapping)."""
    if calibration is None:
        raise CalibrationError("no calibration data given (calibration=None)")
    if isinstance(calibration, (np.ndarray, Mapping)):
        return [calibration]
    if isinstance(calibration, (str, bytes, os.PathLike)):
        raise CalibrationError(
            f"calibration must be arrays, not a path ({str(calibration)!r}); "
            "load files with bnexport.quantize.calibration.load_calibration_files"
        )
    if isinstance(calibration, Iterable):
        return list(calibration)
    raise CalibrationError(
        "calibration must be an array, a dict {input name: array} or an iterable of them. "
        f"Received: {type(calibration).__name__}"
    )


def _finite(batch: Mapping[str, np.ndarray], where: str) -> None:
    for name, arr in batch.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise CalibrationError(f"calibration input {name!r}{where}: {bad} NaN/Inf value(s)")


def _static_batch(infos: Sequence[Any]) -> int | None:
    """The model's static batch size, if every input states the same one."""
    sizes = {info.shape[0] if info.shape else None for info in infos}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def _presplit(item: Any, infos: Sequence[Any], static: int) -> list[Any]:
    """Cut a raw batch into chunks of the model's static batch size (before validation)."""
    feed = item if isinstance(item, Mapping) else {infos[0].name: item}
    arrays = {k: np.asarray(v) for k, v in feed.items()}
    if len(infos) != 1 and not isinstance(item, Mapping):
        return [item]  # check_inputs names the problem
    leading = {a.shape[0] for a in arrays.values() if a.ndim}
    if len(leading) != 1 or any(a.ndim == 0 for a in arrays.values()):
        return [item]
    n = leading.pop()
    if n % static:
        name = next(iter(arrays))
        raise CalibrationError(
            f"calibration input {name!r}: {n} samples do not split into batches of the "
            f"model's static batch size {static}"
        )
    return [{k: v[i : i + static] for k, v in arrays.items()} for i in range(0, n, static)]


def _split(feed: dict[str, np.ndarray], infos: Sequence[Any], batch_size: int) -> list[dict]:
    """Split a validated ``feed`` along axis 0 into batches of at most ``batch_size``."""
    first = infos[0]
    arrays = list(feed.values())
    if any(a.ndim == 0 for a in arrays) or _static_batch(infos) is not None:
        return [feed]
    n = feed[first.name].shape[0]
    for info in infos:
        if feed[info.name].shape[0] != n:
            raise CalibrationError(
                f"calibration input {info.name!r}: {feed[info.name].shape[0]} samples, but "
                f"input {first.name!r} has {n}; every input needs the same number of samples"
            )
    return [{k: v[i : i + batch_size] for k, v in feed.items()} for i in range(0, n, batch_size)]


def make_calibration_set(
    calibration: Any, model_inputs: Sequence[Any], *, batch_size: int = DEFAULT_BATCH
) -> CalibrationSet:
    """Validate ``calibration`` against the model's inputs.

    Args:
        calibration: an array, a dict ``{name: array}``, or an iterable of those (batches).
        model_inputs: :class:`~bnexport.runtime.io_check.TensorInfo` of each graph input
            (initializers excluded).
        batch_size: calibration batch size for a dynamic batch dimension.

    Returns:
        The :class:`CalibrationSet`.

    Raises:
        CalibrationError: no batches or zero samples, an unknown/missing input name, a wrong
            rank, static dimension or dtype, NaN/Inf values, unequal sample counts. The
            message names the input (and the batch when there are several).
    """
    from bnexport.runtime.io_check import check_inputs

    if not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"batch_size must be a positive int. Received: {batch_size!r}")
    raw = _raw_batches(calibration)
    if not raw:
        raise CalibrationError("calibration data is empty (no batches)")
    infos = list(model_inputs)
    static = _static_batch(infos)
    if static is not None:
        raw = [chunk for item in raw for chunk in _presplit(item, infos, static)]
    batches: list[dict[str, np.ndarray]] = []
    for i, item in enumerate(raw):
        where = f" (calibration batch {i})" if len(raw) > 1 else ""
        try:
            feed = check_inputs(item, infos, cast=True)
        except InputError as exc:
            raise CalibrationError(f"calibration data{where}: {exc}") from None
        _finite(feed, where)
        for name, arr in feed.items():
            if arr.ndim and arr.shape[0] == 0:
                raise CalibrationError(f"calibration input {name!r}{where}: zero samples")
        batches.extend(_split(feed, infos, batch_size))
    return CalibrationSet(batches, [info.name for info in infos])


def load_calibration_files(paths: Sequence[str | os.PathLike[str]]) -> list[Any]:
    """Load ``.npy``/``.npz`` files as calibration batches, never unpickling.

    Reading is :func:`bnexport.io.arrays.load_arrays` (the project's one array loader).
    A ``.npy`` file is one array (single-input models); a ``.npz`` archive is one dict
    ``{array name: array}``, the names being the model's input names — except that a
    single-array archive saved without a name (``arr_0``) is returned as a bare array.

    Raises:
        CalibrationError: no files given.
        FileMissingError: a file does not exist.
        ArrayFileError: a truncated, non-NumPy or pickled file, another extension (the
            file is named).
    """
    from bnexport.io.arrays import load_arrays

    if not paths:
        raise CalibrationError("no calibration files given")
    batches: list[Any] = []
    for path in paths:
        arrays = load_arrays(path)
        if list(arrays) in ([""], ["arr_0"]):
            batches.append(next(iter(arrays.values())))
        elif not arrays:
            raise CalibrationError(f"calibration file {os.fspath(path)!r}: the archive is empty")
        else:
            batches.append(arrays)
    return batches
