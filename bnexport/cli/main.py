"""The ``bnexport`` command line, and the one place where errors become messages.

Each subcommand lives in its own module ``bnexport.cli.cmd_<name>`` exposing
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Modules are imported only to build the parser (they must keep their own heavy
imports inside ``run``), so ``bnexport --help`` is fast and never loads TensorFlow.

Error translation happens here and only here (:func:`translate`): commands and the
library raise typed exceptions, and an expected one becomes exactly one line on
stderr, ``bnexport <command>: error: <message naming the file/field>``:

- :class:`~bnexport.errors.UsageError` (bad arguments, unusable input files, an output
  that would overwrite an input): exit 2;
- any other :class:`~bnexport.errors.BnexportError`, an ``OSError`` naming a file, or a
  missing optional dependency (named with the extra that installs it): exit 1;
- ``KeyboardInterrupt``: exit 130.

Anything else is a bug and keeps its traceback. ``--debug`` (before or after the
command) or ``BNEXPORT_DEBUG=1`` shows the traceback of expected errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from bnexport import __version__
from bnexport.errors import BnexportError, UsageError
from bnexport.extras import missing_extra_message

#: subcommand modules, in the order ``--help`` lists them (absent modules are skipped)
COMMANDS = (
    "quickstart",
    "export",
    "fold",
    "quantize",
    "run",
    "parity",
    "serve",
    "triton_repo",
)

#: OSErrors that always concern a path the user gave (their message names it)
_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

DEBUG_ENV = "BNEXPORT_DEBUG"
_DEBUG_HELP = f"show the traceback of expected errors too (or set {DEBUG_ENV}=1)"


def _one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def translate(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` for an expected error; ``None`` for a bug (keep the traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, UsageError):
        return 2, _one_line(str(exc))
    if isinstance(exc, BnexportError):
        return 1, _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, ModuleNotFoundError):
        message = missing_extra_message(exc)
        return None if message is None else (1, message)
    if isinstance(exc, _FILE_ERRORS) or (
        isinstance(exc, OSError) and (exc.filename is not None or exc.strerror)
    ):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return 1, _one_line(f"{where}{exc.strerror or exc}") or type(exc).__name__
    return None


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="bnexport",
        description="Batch-normalized Keras models from training to fast, verified inference.",
        epilog="Expected errors print one line and exit 1 (2: usage or unusable input). "
        f"--debug or {DEBUG_ENV}=1 shows their traceback.",
    )
    parser.add_argument("--version", action="version", version=f"bnexport {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bnexport.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bnexport.cli.cmd_{name}":
                continue  # subcommand not part of this build
            raise
        cmd = module.add_parser(sub)
        if "--debug" not in cmd._option_string_actions:  # also accepted after the command
            cmd.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnexport`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    if not debug:  # TensorFlow's C++ INFO/WARNING lines would bury the one-line error
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BaseException as exc:
        translated = translate(exc)
        if translated is None or debug:
            raise
        code, message = translated
        if code == 130:
            print(f"bnexport {args.command}: interrupted", file=sys.stderr)
        else:
            print(f"bnexport {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
