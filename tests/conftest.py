"""Shared test setup.

TensorFlow (when the test session needs it) gets two logical CPU devices so
``MirroredStrategy`` can run synchronized batch norm, and TF32 is disabled so
float32 results match the NumPy references at float32 tolerances.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _configure_tensorflow() -> None:
    """Split the CPU into two logical devices before TensorFlow initializes."""
    try:
        import tensorflow as tf
    except ImportError:  # inference-only environment
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        pass  # already initialized by an earlier import; multi_device tests skip
    tf.config.experimental.enable_tensor_float_32_execution(False)


def pytest_configure(config) -> None:  # noqa: D103
    _configure_tensorflow()


def pytest_collection_modifyitems(config, items) -> None:
    """The one place that decides skips for what this machine lacks.

    Tests say what they need with ``@pytest.mark.needs(...)`` /
    ``@pytest.mark.needs_absent(...)`` (see ``tests/support/capabilities.py``); a test that
    cannot run here gets a ``skip`` marker with the reason, so the report points at it.
    """
    import pytest
    from support.capabilities import skip_reason

    for item in items:
        reason = skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
