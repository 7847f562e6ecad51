"""A cheap look at a Keras model path before Keras or TensorFlow is asked to load it.

Keras and h5py answer a text file, an empty file or a zip of garbage with a
``ValueError`` that says "File not found", a ``JSONDecodeError`` or an ``OSError``
("file signature not found"), deep in a traceback. The checks here read a few bytes
(never the weights, never any code) and raise one :class:`~bnexport.errors.ModelFileError`
naming the file:

- ``.keras``: a zip archive holding a ``config.json`` that parses as a JSON object
  (and, when present, a ``model.weights.h5`` that starts with the HDF5 signature);
- ``.h5`` / ``.hdf5``: the HDF5 signature at offset 0, 512, 1024, ... (a user block
  may precede it);
- a folder: a SavedModel, i.e. ``saved_model.pb`` or ``saved_model.pbtxt`` inside.

Other suffixes pass through unchecked (the loader decides). A file that passes these
checks can still be broken deeper (a config naming unknown classes, an HDF5 file with a
bad superblock, a SavedModel protobuf that does not parse): :func:`keras_load_errors`
wraps the Keras/TensorFlow load call and turns what they raise about the *file*
(``ValueError``, ``TypeError``, ``KeyError``, ``OSError``) into ``ModelFileError`` with
their first line; bnexport's own errors (safe-mode refusals included) and missing
modules pass unchanged. Nothing here imports Keras.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from bnexport.errors import BnexportError, FileMissingError, ModelFileError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(head_reader, size: int) -> bool:
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= size and offset <= 1 << 20:
        if head_reader(offset) == HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


def _check_h5(path: Path, desc: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:

        def read(offset: int) -> bytes:
            fh.seek(offset)
            return fh.read(len(HDF5_SIGNATURE))

        if not _is_hdf5(read, size):
            raise ModelFileError(f"{desc}: not an HDF5 (.h5) model file (no HDF5 signature)")


def _check_keras_zip(path: Path, desc: str) -> None:
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{desc}: not a .keras archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelFileError(f"{desc}: not a .keras archive (no config.json inside)")
            try:
                config = json.loads(zf.read("config.json").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelFileError(
                    f"{desc}: corrupt .keras archive (config.json is not valid JSON)"
                ) from exc
            if not isinstance(config, dict):
                raise ModelFileError(
                    f"{desc}: corrupt .keras archive (config.json is not an object)"
                )
            if "model.weights.h5" in names:
                with zf.open("model.weights.h5") as weights:
                    head = weights.read(len(HDF5_SIGNATURE))
                if head != HDF5_SIGNATURE:
                    raise ModelFileError(
                        f"{desc}: corrupt .keras archive (model.weights.h5 is not HDF5)"
                    )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise ModelFileError(f"{desc}: corrupt .keras archive ({exc})") from exc


def check_keras_source(path: str | os.PathLike[str]) -> Path:
    """Refuse a ``.keras`` / ``.h5`` file or SavedModel folder that cannot be a model.

    Args:
        path: the model path given by the user.

    Returns:
        The path (``~`` expanded).

    Raises:
        FileMissingError: nothing exists at ``path``.
        ModelFileError: empty, not the format its suffix says, or a folder that is no
            SavedModel (see the module docstring).
    """
    desc = os.fspath(path)
    file = Path(desc).expanduser()
    if not file.exists():
        raise FileMissingError(f"model path {desc!r} does not exist")
    if file.is_dir():
        if not any((file / n).is_file() for n in ("saved_model.pb", "saved_model.pbtxt")):
            raise ModelFileError(
                f"{desc}: a folder without saved_model.pb (not a SavedModel directory)"
            )
        return file
    suffix = file.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5") and file.stat().st_size == 0:
        raise ModelFileError(f"{desc}: the file is empty")
    if suffix == ".keras":
        _check_keras_zip(file, desc)
    elif suffix in (".h5", ".hdf5"):
        _check_h5(file, desc)
    return file


@contextlib.contextmanager
def keras_load_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Translate what Keras / h5py / TensorFlow raise while deserializing ``path``.

    Use around the load call only (not around bnexport's own processing of the model):
    ``ValueError``, ``TypeError``, ``KeyError``, ``OSError`` and ``EOFError`` raised in the
    block become one :class:`ModelFileError` naming the file; ``BnexportError`` and
    ``ImportError`` propagate unchanged.
    """
    try:
        yield
    except BnexportError:
        raise
    except (ValueError, TypeError, KeyError, OSError, EOFError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        if len(first) > 300:
            first = first[:297] + "..."
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise ModelFileError(f"{os.fspath(path)}: cannot load the model ({reason})") from exc
