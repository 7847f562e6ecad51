"""Helpers of the server tests: an app over a model repository on disk.

``running_server`` and ``metric`` live in :mod:`support` (shared by every test
folder); they are re-exported here for the files that import them from this module.
"""

from __future__ import annotations

import threading

from support import metric, running_server

from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.rest.app import create_app

__all__ = ["hold_model_runs", "make_app", "metric", "running_server"]


def make_app(path, *, max_batch=32, batch_timeout_ms=10.0, **kwargs):
    """``create_app`` over the repository (or ``.onnx`` file) at ``path``."""
    repo = ModelRepository.from_path(path, max_batch=max_batch, batch_timeout_ms=batch_timeout_ms)
    return create_app(repo, **kwargs)


def hold_model_runs(app, name="digits", version="2"):
    """Make every run of ``name`` (at ``version``) wait for ``release``; returns
    ``(release, entered)``, ``entered`` being set once a run waits.

    A stand-in for a stuck or slow model: a test holds requests in flight for exactly
    as long as it needs. Call it before the model's first request (the batcher, made
    then, reads ``model.run``).
    """
    model = app.state.repository.get(name, version)
    run = model.run
    release, entered = threading.Event(), threading.Event()

    def held_run(feed):
        entered.set()
        assert release.wait(60), "the test never released the model"
        return run(feed)

    model.run = held_run
    return release, entered
