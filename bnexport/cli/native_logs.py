"""Keep TensorFlow's, absl's and gRPC core's native log lines off a command's output.

A fresh ``import tensorflow`` writes to file descriptor 2 from C++ before anything in
Python can intervene: ``All log messages before absl::InitializeLog() ...``, oneDNN's
and ``cudart_stub``'s I-lines, then at the first op ``failed call to cuInit ... (303)``
(an E-line on every machine without a GPU). ``TF_CPP_MIN_LOG_LEVEL=3`` silences what
TensorFlow logs once absl is initialized; the lines written while its shared libraries
load ignore it (TensorFlow 2.21). So the command line, and only the command line
(a Python program embedding bnexport keeps its own environment and descriptors):

- sets ``TF_CPP_MIN_LOG_LEVEL=3`` and ``GRPC_VERBOSITY=ERROR`` unless the user set them,
  before TensorFlow or grpc are imported (:func:`quiet_native_logs`);
- installs an import hook that points descriptor 2 at a temporary file while the
  ``tensorflow`` package itself is imported, and writes what was caught back to stderr
  if that import fails (so a broken install still says why);
- lowers TensorFlow's and absl's Python loggers to ERROR once TensorFlow is imported.

``-v`` (or a ``TF_CPP_MIN_LOG_LEVEL`` the user set) turns all of this off: the lines are
then TensorFlow's to print.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from typing import Any

from bnexport.stderr_capture import captured_fd2, read_captured

#: environment variables the command line sets when the user has not
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}


def _lower_python_loggers() -> None:
    for name in ("tensorflow", "absl", "tf2onnx"):
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path hook: import ``tensorflow`` with descriptor 2 captured (once)."""

    def __init__(self) -> None:
        self._spec: Any = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "tensorflow" or self._spec is not None:
            return None
        sys.meta_path.remove(self)  # let the real finders answer, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._spec = spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        error: BaseException | None = None
        with captured_fd2() as sink:
            try:
                self._loader.exec_module(module)
            except BaseException as exc:  # noqa: BLE001 - replayed and re-raised below
                error = exc
                caught = read_captured(sink)
        if error is not None:  # the lines may say why TensorFlow did not import
            sys.stderr.write(caught)
            sys.stderr.flush()
            raise error
        _lower_python_loggers()


def _hook_installed() -> bool:
    return any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path)


def quiet_native_logs(verbose: bool = False) -> bool:
    """Silence TensorFlow's/absl's/gRPC's native logs for this command line process.

    Args:
        verbose: ``-v`` was given: change nothing.

    Returns:
        Whether the logs were quieted (``False`` with ``verbose`` or when the user set
        ``TF_CPP_MIN_LOG_LEVEL``: their choice stands, descriptor 2 is left alone).
    """
    if verbose:
        return False
    os.environ.setdefault("GRPC_VERBOSITY", QUIET_ENV["GRPC_VERBOSITY"])
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return False
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "tensorflow" in sys.modules:
        _lower_python_loggers()
    elif not _hook_installed():
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    return True
