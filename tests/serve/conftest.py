"""Fixtures of the server tests: a model repository on disk and an in-process server.

A server runs uvicorn in a daemon thread on a free loopback port (port 0), so
``tritonclient.http`` talks to it over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from serve_helpers import make_app, running_server
from serve_models import digits_cnn, gather_model


@pytest.fixture(scope="session")
def repo_dir(tmp_path_factory) -> Path:
    """digits v1 (seed 0) and v2 (seed 1), gather v1 (fails on a bad index)."""
    root = tmp_path_factory.mktemp("repo")
    for version, seed in (("1", 0), ("2", 1)):
        (root / "digits" / version).mkdir(parents=True)
        onnx.save(digits_cnn(seed), root / "digits" / version / "model.onnx")
    (root / "gather" / "1").mkdir(parents=True)
    onnx.save(gather_model(), root / "gather" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(repo_dir) -> Iterator[str]:
    """The repository served with defaults (max_batch 32, 10 ms) and a 1 MiB body limit."""
    with running_server(make_app(repo_dir, max_body_bytes=1 << 20)) as url:
        yield url
