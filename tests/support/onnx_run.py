"""Run an ONNX model the way graph tests must: onnxruntime with graph optimizations off."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx


def _model(path_or_model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    return onnx.load(path_or_model)


def run_ort(
    path_or_model: onnx.ModelProto | str | os.PathLike,
    feeds: dict[str, np.ndarray],
    *,
    threads: int = 1,
) -> list[np.ndarray]:
    """Outputs of ``path_or_model`` on onnxruntime CPU, every graph optimization disabled.

    onnxruntime folds BatchNormalization into Conv itself at its default level, so a
    broken fold pass would pass unnoticed with it on. The session is the project's own,
    :func:`bnexport.runtime.ort_session.make_session` (``optimize=False``): a graph holding
    ``FusedNorm`` runs with the plugin's CPU kernel registered.
    """
    from bnexport.runtime.ort_session import make_session

    return make_session(path_or_model, optimize=False, threads=threads).run(None, feeds)


def op_counts(path_or_model: onnx.ModelProto | str | os.PathLike) -> collections.Counter:
    """Count of each ``op_type`` in the main graph (a missing op counts 0)."""
    return collections.Counter(n.op_type for n in _model(path_or_model).graph.node)
