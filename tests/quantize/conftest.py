"""Fixtures of the INT8 tests: the small BN CNN on disk and its calibration data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from qmodels import images, small_cnn  # noqa: E402


@pytest.fixture()
def cnn_path(tmp_path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


@pytest.fixture(scope="session")
def calib() -> np.ndarray:
    return images(64)
