"""Write files atomically: a temp file in the target directory, then ``os.replace``.

A reader sees either the old file or the complete new one, never a partial write;
a failure or ``KeyboardInterrupt`` during the write removes the temp file. Every
output of the project (ONNX graphs, reports, engines, kernel caches, Triton
repositories, the quickstart's model) goes through this module.

Unusable output paths raise ``error`` (``BnexportError`` by default; the exporter
passes ``ExportError``) with a message naming the path, before anything is created.

:func:`check_output_paths` is the guard every command runs before any work: an output
that is the same file as an input, or as another output, is refused (one
:class:`~bnexport.errors.OutputPathError` naming both), so ``export m.keras -o m.keras``
or ``--json`` onto the ONNX file cannot destroy anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from bnexport.errors import BnexportError, OutputPathError

ErrorType = type[BnexportError]
PathLike = str | os.PathLike[str]


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: equal real paths, or ``samefile`` (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> bool:
    """Whether ``child`` lies strictly inside the existing directory ``folder``."""
    if not folder.is_dir():
        return False
    real_child, real_folder = Path(os.path.realpath(child)), Path(os.path.realpath(folder))
    return real_folder in real_child.parents


def check_output_paths(
    outputs: Mapping[str, PathLike | None],
    inputs: Mapping[str, PathLike | None] | None = None,
    *,
    in_place: Collection[tuple[str, str]] = (),
    error: ErrorType = OutputPathError,
) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other.

    Keys are how the user named each path (``"-o/--output"``, ``"--json"``, ``"MODEL"``);
    ``None`` values (an option not given) are skipped. Paths are compared after
    resolving symbolic links, ``..`` and relative paths, and with ``os.path.samefile``
    (hard links). Refused:

    - an output that is the same file as an input or as another output;
    - an input inside an output that is a folder (``triton-repo`` writes a model folder);
    - an output that exists inside an input folder (a file of a SavedModel).

    Args:
        outputs: ``{label: path}`` of everything the command will write.
        inputs: ``{label: path}`` of everything it reads.
        in_place: ``(output label, input label)`` pairs that may be one file, for
            commands whose write is atomic and reads the input fully first
            (``fold x.onnx -o x.onnx``).
        error: the exception type raised.

    Raises:
        error: one message naming both paths and their labels.
    """
    outs = [(k, Path(v).expanduser()) for k, v in outputs.items() if v is not None]
    ins = [(k, Path(v).expanduser()) for k, v in (inputs or {}).items() if v is not None]
    allowed = set(in_place)
    for i, (label, out) in enumerate(outs):
        for other_label, other in outs[:i]:
            if _same_file(out, other):
                raise error(
                    f"{label} {str(out)!r} and {other_label} {str(other)!r} are the same file; "
                    "each output needs its own path"
                )
        for in_label, src in ins:
            if _same_file(out, src):
                if (label, in_label) in allowed:
                    continue
                raise error(
                    f"{label} {str(out)!r} is the input {in_label} {str(src)!r}; writing it "
                    "would destroy the input. Choose another path"
                )
            if _inside(src, out):
                raise error(
                    f"{label} {str(out)!r} is a folder that holds the input {in_label} "
                    f"{str(src)!r}; writing it could destroy the input. Choose another folder"
                )
            if out.exists() and _inside(out, src):
                raise error(
                    f"{label} {str(out)!r} is a file inside the input {in_label} {str(src)!r}; "
                    "writing it would change the input. Choose another path"
                )


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
