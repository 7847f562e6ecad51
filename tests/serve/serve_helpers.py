"""Helpers of the server tests: an app over a model repository on disk.

``running_server`` and ``metric`` live in :mod:`support` (shared by every test
folder); they are re-exported here for the files that import them from this module.
"""

from __future__ import annotations

from support import metric, running_server

from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.rest.app import create_app

__all__ = ["make_app", "metric", "running_server"]


def make_app(path, *, max_batch=32, batch_timeout_ms=10.0, **kwargs):
    """``create_app`` over the repository (or ``.onnx`` file) at ``path``."""
    repo = ModelRepository.from_path(path, max_batch=max_batch, batch_timeout_ms=batch_timeout_ms)
    return create_app(repo, **kwargs)
