"""The ``bnexport`` command line, and the one place where errors become messages.

Each subcommand lives in its own module ``bnexport.cli.cmd_<name>`` exposing
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Modules are imported only to build the parser (they must keep their own heavy
imports inside ``run``), so ``bnexport --help`` is fast and never loads TensorFlow.
Options shared by several commands are declared once in :mod:`bnexport.cli.options`;
``-q``, ``-v`` and ``--debug`` are added to every command here.

Error translation happens here and only here (:func:`translate`): commands and the
library raise typed exceptions, and an expected one becomes exactly one line on
stderr, ``bnexport <command>: error: <message naming the file/field>``, with the exit
code that :data:`bnexport.errors.EXIT_CODES` gives its type: 2 for a request that
cannot be carried out as given (bad arguments, unusable input files or output folders,
a missing optional dependency, named with the extra that installs it), 1 when the work
failed, 130 for ``KeyboardInterrupt``.

Anything else is a bug and keeps its traceback. ``--debug`` (before or after the
command) or ``BNEXPORT_DEBUG=1`` prints the traceback of expected errors too, and keeps
their exit code. Before a command runs, TensorFlow's and gRPC's native log lines are
silenced unless ``-v`` is given (:mod:`bnexport.cli.native_logs`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from bnexport import __version__
from bnexport.cli.native_logs import quiet_native_logs
from bnexport.cli.options import DEBUG_ENV, add_common, cli_spelling, verbosity
from bnexport.errors import PATH_ERRORS, BnexportError, exit_code
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


def _one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def translate(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` for an expected error; ``None`` for a bug (keep the traceback).

    The code comes from :data:`bnexport.errors.EXIT_CODES`; this function only words
    the message.
    """
    code = exit_code(exc)
    if code is None:
        return None
    if isinstance(exc, KeyboardInterrupt):
        return code, "interrupted"
    if type(exc) is ModuleNotFoundError:  # ours (MissingExtraError) carry their message
        message = missing_extra_message(exc)
        return None if message is None else (code, message)
    if isinstance(exc, OSError) and not isinstance(exc, BnexportError):
        if not isinstance(exc, PATH_ERRORS) and exc.filename is None and not exc.strerror:
            return None  # an OSError that names no file and no reason: a bug
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return code, _one_line(f"{where}{exc.strerror or exc}") or type(exc).__name__
    return code, _one_line(str(exc)) or type(exc).__name__


def _debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="bnexport",
        description="Batch-normalized Keras models from training to fast, verified inference.",
        epilog="Expected errors print one line; exit 2: bad arguments or unusable inputs "
        "(including a missing extra), 1: the work failed. "
        f"--debug or {DEBUG_ENV}=1 also prints their traceback.",
    )
    parser.add_argument("--version", action="version", version=f"bnexport {__version__}")
    add_common(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bnexport.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bnexport.cli.cmd_{name}":
                continue  # subcommand not part of this build
            raise
        cmd = module.add_parser(sub)
        if "--verbose" not in cmd._option_string_actions:  # also accepted after the command
            add_common(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnexport`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or _debug_requested()
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    quiet_native_logs(verbose=verbosity(args) > 0)
    try:
        return int(args._run(args) or 0)
    except BaseException as exc:
        translated = translate(exc)
        if translated is None:
            raise  # a bug: Python prints the traceback, exit 1
        code, message = translated
        if debug:
            traceback.print_exc()
        if code == 130:
            print(f"bnexport {args.command}: interrupted", file=sys.stderr)
        else:
            print(f"bnexport {args.command}: error: {cli_spelling(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
