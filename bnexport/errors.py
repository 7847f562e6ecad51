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
        ├── FileFormatError (ValueError) ── ModelFileError, ArrayFileError
        └── SignatureMismatchError (ValueError)  two models' inputs do not match

Exit codes: :data:`EXIT_CODES` is the one table that maps an error type to the
command line's exit code (:func:`exit_code`): 2 for a request that cannot be carried
out as given (bad arguments, unusable input files, a missing output folder, a missing
optional dependency or backend), 1 when the work itself failed.

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


class SignatureMismatchError(UsageError, ValueError):
    """Two models given together do not take the same inputs (names both signatures)."""


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


#: OSErrors that concern a path the user gave (their message names it): unusable input
PATH_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

#: error type -> exit code of the command line; the first row that matches wins, so a
#: subclass is listed before its base. 2: the request cannot be carried out as given
#: (usage, unusable input or output path, a missing extra or backend); 1: the work
#: failed (an export that does not verify, a graph that cannot fold, a disk error).
EXIT_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (KeyboardInterrupt, 130),
    (UsageError, 2),
    (BackendUnavailableError, 2),  # MissingExtraError included
    (UnsafeModelError, 2),  # refused until the user opts in (--unsafe-load)
    (InputError, 2),  # inputs of the wrong name, shape or dtype
    (CalibrationError, 2),  # calibration data of the wrong name, shape or dtype
    (ModuleNotFoundError, 2),  # a missing optional dependency (see bnexport.extras)
    (BnexportError, 1),
    (PATH_ERRORS, 2),
    (OSError, 1),
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code :data:`EXIT_CODES` gives ``exc``; ``None`` for an unexpected error (a bug)."""
    for kinds, code in EXIT_CODES:
        if isinstance(exc, kinds):
            return code
    return None
