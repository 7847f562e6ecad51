"""Exception types a caller can catch.

Every error names the layer, node, input, file or field at fault. The CLI
(:mod:`bnexport.cli.main`) turns any ``BnexportError`` into one readable line and
a non-zero exit code (2 for :class:`UsageError` and its subclasses, 1 otherwise);
only unexpected exceptions (bugs) produce a traceback.

Hierarchy::

    BnexportError
    ├── LayerConfigError (ValueError)
    ├── ExportError ── FoldError, VerificationError
    ├── InputError (ValueError)
    ├── BackendUnavailableError ── MissingExtraError (ImportError)
    ├── PluginError
    ├── UnsafeModelError (ValueError)  loading would run code stored in the file
    └── UsageError
        ├── OutputPathError            an output would overwrite an input / another output
        ├── FileMissingError (FileNotFoundError)
        └── FileFormatError (ValueError) ── ModelFileError, ArrayFileError

Third-party failures (protobuf ``DecodeError``, onnx ``ValidationError``,
onnxruntime load errors, ``np.load``'s ``ValueError``, ``zipfile.BadZipFile``) are
translated into these at the loaders (:mod:`bnexport.io`), so the Python API and
the CLI raise the same types.
"""

from __future__ import annotations


class BnexportError(Exception):
    """Base class of every expected error raised by bnexport."""


class LayerConfigError(BnexportError, ValueError):
    """A layer argument is invalid (names the argument and the value received)."""


class ExportError(BnexportError):
    """A model could not be exported (names the layer or node at fault)."""


class FoldError(ExportError):
    """A graph pass met a node it cannot handle (names the node)."""


class VerificationError(ExportError):
    """The exported graph disagrees with the source model beyond tolerance."""


class InputError(BnexportError, ValueError):
    """An inference input is missing, unknown, or has the wrong shape/dtype."""


class BackendUnavailableError(BnexportError):
    """A requested backend (TensorRT, CUDA, ...) is not installed or has no device."""


class PluginError(BnexportError):
    """The fused-normalization op was given attributes or tensors it cannot run."""


class UsageError(BnexportError):
    """A command-line argument or file given by the user is unusable."""


class UnsafeModelError(BnexportError, ValueError):
    """Loading a model file would run Python code stored in it (a ``Lambda`` layer).

    Raised in safe mode (the default); names the layer and the opt-in
    (``safe_mode=False`` in Python, ``--unsafe-load`` on the command line).
    """


class OutputPathError(UsageError):
    """An output path resolves to an input, or to another output of the same command."""


class FileMissingError(UsageError, FileNotFoundError):
    """A file or folder given by the user does not exist (names the path)."""


class FileFormatError(UsageError, ValueError):
    """A file given by the user is not what it should be (names the file and what is wrong)."""


class ModelFileError(FileFormatError):
    """A model file (ONNX, .keras, .h5, SavedModel) is corrupt, truncated, or cannot be loaded."""


class ArrayFileError(FileFormatError):
    """A ``.npy`` / ``.npz`` file is truncated, not NumPy, or holds pickled objects."""


class MissingExtraError(BackendUnavailableError, ImportError):
    """A feature needs an optional dependency; the message names the extra that installs it."""


class QuantizeError(BnexportError):
    """A graph could not be quantized to INT8 (names the node, input or option at fault)."""


class CalibrationError(QuantizeError, ValueError):
    """Calibration data is empty or has the wrong input name, shape or dtype (names the input)."""
