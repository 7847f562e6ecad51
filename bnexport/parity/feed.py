"""The inputs of a parity run: read, generated or given, named after the ONNX inputs.

:func:`prepare_feed` accepts what :func:`bnexport.parity.check_parity` does for
``inputs``: ``None`` (``samples`` generated samples, :mod:`bnexport.sample_inputs`, the
same generator the exporter's verification uses), a ``.npz``/``.npy`` path, one NumPy
array (a single-input model, like ``x.npy``), a list/tuple of arrays (one per input, in
order) or a dict keyed by ONNX or Keras input names. The result is checked against the
graph's inputs (names, dtypes, ranks) before anything runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.errors import InputError, UsageError
from bnexport.parity.runners import keras_input_names
from bnexport.runtime.io_check import TensorInfo
from bnexport.sample_inputs import make_inputs

__all__ = ["fit_feed", "load_inputs", "make_inputs", "prepare_feed"]


def load_inputs(source: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a feed from ``.npz`` (one array per input name) or ``.npy`` (key ``""``).

    Raises:
        UsageError: missing file, another extension, or an unreadable array file
            (``FileMissingError`` / ``ArrayFileError`` name the file).
    """
    from bnexport.io.arrays import load_arrays

    return load_arrays(source)


def fit_feed(
    feed: Mapping[str, Any], infos: Sequence[TensorInfo], keras_model: Any
) -> dict[str, Any]:
    """Name the feed after the ONNX inputs.

    An unnamed array (key ``""``) feeds the only input. A feed keyed by the Keras
    input names (the exporter's names, or the ``KerasTensor`` names of
    ``model.inputs``) is renamed position by position. Other feeds are kept as
    given (and checked against the ONNX inputs later).

    Raises:
        UsageError: an unnamed array for a model with several inputs.
    """
    onnx_names = [i.name for i in infos]
    if list(feed) == [""]:
        if len(infos) != 1:
            raise UsageError(
                f"one array (or a .npy file) feeds a single-input model; this one has "
                f"{len(infos)} inputs ({', '.join(onnx_names)}): pass a dict or a .npz"
            )
        return {infos[0].name: feed[""]}
    if set(feed) == set(onnx_names):
        return dict(feed)
    candidates = [keras_input_names(keras_model), [str(t.name) for t in keras_model.inputs]]
    for names in candidates:
        if set(feed) == set(names) and len(names) == len(onnx_names):
            return {o: feed[k] for k, o in zip(names, onnx_names, strict=True)}
    return dict(feed)


def _as_mapping(inputs: Any, infos: Sequence[TensorInfo]) -> Mapping[str, Any]:
    """``inputs`` given in memory as a name -> array mapping."""
    if isinstance(inputs, Mapping):
        return inputs
    if isinstance(inputs, np.ndarray) or np.isscalar(inputs):
        return {"": np.asarray(inputs)}
    if isinstance(inputs, list | tuple):
        if len(inputs) != len(infos):
            raise UsageError(
                f"{len(inputs)} input arrays given for a model with {len(infos)} inputs "
                f"({', '.join(i.name for i in infos)})"
            )
        return {info.name: np.asarray(a) for info, a in zip(infos, inputs, strict=True)}
    raise UsageError(
        "inputs must be a dict of arrays, an array, a list of arrays or a .npz/.npy path. "
        f"Received: {type(inputs).__name__}"
    )


def prepare_feed(
    inputs: Any,
    infos: Sequence[TensorInfo],
    keras_model: Any,
    *,
    samples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The checked feed ``{onnx input name: array}`` for a parity run.

    Args:
        inputs: see the module docstring.
        infos: the ONNX graph's inputs (initializers excluded).
        keras_model: the reference (its input names are accepted as keys).
        samples: generated samples along a dynamic batch dimension (``inputs=None``).
        seed: seed of the generated samples.

    Raises:
        UsageError: unreadable file, wrong names, shapes or dtypes (names the input).
    """
    from bnexport.runtime.io_check import check_inputs

    if inputs is None:
        feed = make_inputs(infos, samples, seed)
    elif isinstance(inputs, str | os.PathLike):
        feed = fit_feed(load_inputs(inputs), infos, keras_model)
    else:
        feed = fit_feed(_as_mapping(inputs, infos), infos, keras_model)
    try:
        return check_inputs(feed, infos)
    except InputError as exc:
        raise UsageError(str(exc)) from exc
