"""Write files atomically: a temp file in the target directory, then ``os.replace``.

A reader sees either the old file or the complete new one, never a partial write;
a failure or ``KeyboardInterrupt`` during the write removes the temp file. Every
output of the project (ONNX graphs, reports, engines, kernel caches, Triton
repositories, the quickstart's model) goes through this module.

Unusable output paths raise ``error`` (``BnexportError`` by default; the exporter
passes ``ExportError``) with a message naming the path, before anything is created.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnexport.errors import BnexportError

ErrorType = type[BnexportError]


def check_writable(
    path: str | os.PathLike[str],
    *,
    make_parents: bool = False,
    error: ErrorType = BnexportError,
) -> Path:
    """Fail early, creating nothing (but folders, with ``make_parents``), if ``path`` is unwritable.

    Args:
        path: the output file.
        make_parents: create missing parent folders first (caches, repositories).
        error: the exception type raised.

    Returns:
        The absolute output path.

    Raises:
        error: the parent directory is missing or not writable, or ``path`` is a directory.
    """
    out = Path(path).expanduser().absolute()
    parent = out.parent
    if make_parents:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise error(f"cannot create directory {str(parent)!r}: {exc.strerror or exc}") from None
    if out.is_dir():
        raise error(f"output path {str(out)!r} is a directory")
    if not parent.is_dir():
        raise error(f"cannot write {str(out)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {str(out)!r}: directory {str(parent)!r} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise error(f"cannot write {str(out)!r}: file exists and is not writable")
    try:  # the only reliable test (root, read-only mounts, ACLs): create and remove a file
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise error(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    suffix: str = "",
    make_parents: bool = False,
    error: ErrorType = BnexportError,
) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it onto ``path``.

    Anything raised inside the block (``KeyboardInterrupt`` included) deletes the
    temp file and propagates; ``path`` is then untouched. ``suffix`` ends the temp
    name, for writers that insist on an extension (``model.save`` wants ``.keras``).
    """
    out = check_writable(path, make_parents=make_parents, error=error)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{out.name}.", suffix=f".tmp{suffix}", dir=out.parent
        )
    except OSError as exc:
        raise error(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    make_parents: bool = False,
    error: ErrorType = BnexportError,
) -> Path:
    """Write ``data`` to ``path`` atomically and return the absolute path."""
    with atomic_path(path, make_parents=make_parents, error=error) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path).expanduser().absolute()


def write_text_atomic(
    path: str | os.PathLike[str],
    text: str,
    *,
    make_parents: bool = False,
    error: ErrorType = BnexportError,
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the absolute path."""
    return write_bytes_atomic(path, text.encode("utf-8"), make_parents=make_parents, error=error)
