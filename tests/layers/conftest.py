"""Fixtures shared by the layer tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator (every test sees the same data)."""
    return np.random.default_rng(1234)
