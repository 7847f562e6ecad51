"""Load ``.npy`` / ``.npz`` arrays from a user's file without ever unpickling.

``np.load`` fails in many ways on a bad file: ``ValueError`` for pickled object arrays
(``allow_pickle=False``) and for files that are not NumPy at all, ``EOFError`` or
``ValueError`` for truncated ones, ``zipfile.BadZipFile`` for a broken ``.npz``, and
an ``.npz`` is read lazily, so a bad member fails only when it is accessed. This module
reads every member at once and turns each of those into one
:class:`~bnexport.errors.ArrayFileError` naming the file (and the member).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from bnexport.errors import ArrayFileError, FileMissingError

_PICKLE_HINT = "holds pickled Python objects, which are never loaded (save numeric arrays)"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "allow_pickle" in text and "Object arrays" in text:
        return _PICKLE_HINT
    if isinstance(exc, EOFError) or any(
        hint in text for hint in ("reshape", "truncated", "not fully written", "Failed to read")
    ):
        return "truncated (fewer bytes than its header announces)"
    if isinstance(exc, zipfile.BadZipFile):
        return f"not a readable .npz archive ({text or 'bad zip file'})"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"not a readable NumPy file ({first})"


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a ``.npz`` (one array per name) or a ``.npy`` (one array, under the key ``""``).

    Args:
        path: the file; its extension decides the format.

    Returns:
        ``{name: array}``; a ``.npy`` file gives ``{"": array}``.

    Raises:
        FileMissingError: the file does not exist.
        ArrayFileError: another extension, a folder, an empty, truncated or non-NumPy
            file, or an array of Python objects (names the file and the member).
    """
    desc = os.fspath(path)
    file = Path(desc).expanduser()
    if file.is_dir():
        raise ArrayFileError(f"{desc}: is a folder, not a .npy/.npz file")
    if not file.exists():
        raise FileMissingError(f"inputs file not found: {desc}")
    suffix = file.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ArrayFileError(f"inputs must be a .npz or .npy file. Received: {desc}")
    if file.stat().st_size == 0:
        raise ArrayFileError(f"{desc}: the file is empty")
    with open(file, "rb") as fh:
        head = fh.read(6)
    if suffix == ".npy" and head != b"\x93NUMPY":
        raise ArrayFileError(f"{desc}: not a NumPy .npy file (no NumPy header)")
    if suffix == ".npz" and not head.startswith(b"PK"):
        raise ArrayFileError(f"{desc}: not a NumPy .npz file (not a zip archive)")
    if suffix == ".npy":
        try:
            return {"": np.load(file, allow_pickle=False)}
        except (ValueError, EOFError, OSError) as exc:
            raise ArrayFileError(f"{desc}: {_reason(exc)}") from exc
    member = None
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {}
            for member in data.files:
                arrays[member] = data[member]
            return arrays
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError) as exc:
        where = f"{desc} (array {member!r})" if member is not None else desc
        raise ArrayFileError(f"{where}: {_reason(exc)}") from exc
