"""Write files atomically: a temp file in the target directory, then ``os.replace``.

A reader sees either the old file or the complete new one, never a partial write;
a failure or ``KeyboardInterrupt`` during the write removes the temp file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnexport.errors import ExportError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, creating nothing, if ``path`` cannot be written.

    Args:
        path: the output file.

    Returns:
        The absolute output path.

    Raises:
        ExportError: the parent directory is missing or not writable, or ``path``
            is a directory.
    """
    out = Path(path).expanduser().absolute()
    parent = out.parent
    if out.is_dir():
        raise ExportError(f"output path {str(out)!r} is a directory")
    if not parent.is_dir():
        raise ExportError(f"cannot write {str(out)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {str(out)!r}: directory {str(parent)!r} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise ExportError(f"cannot write {str(out)!r}: file exists and is not writable")
    try:  # the only reliable test (root, read-only mounts, ACLs): create and remove a file
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it onto ``path``.

    Anything raised inside the block (``KeyboardInterrupt`` included) deletes the
    temp file and propagates; ``path`` is then untouched.
    """
    out = check_writable(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise ExportError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
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


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the absolute path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path).expanduser().absolute()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the absolute path."""
    return write_bytes_atomic(path, text.encode("utf-8"))
