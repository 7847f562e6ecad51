"""The ``bnexport`` command line.

Each subcommand lives in its own module ``bnexport.cli.cmd_<name>`` exposing
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Modules are imported only to build the parser (they must keep their own heavy
imports inside ``run``), so ``bnexport --help`` is fast and never loads TensorFlow.

Expected errors (``BnexportError``, missing files) become one readable line on
stderr and a non-zero exit code; exit code 2 means a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bnexport import __version__
from bnexport.errors import BnexportError, UsageError

#: top-level module -> the extra that installs it, for "not installed" messages
_EXTRA_OF_MODULE = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "prometheus_client": "serve",
    "tensorrt": "tensorrt",
    "tf_keras": "legacy",
    "cuda": "gpu",
    "cupy": "gpu",
}

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = (
    "quickstart",
    "export",
    "fold",
    "run",
    "parity",
    "serve",
    "triton_repo",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="bnexport",
        description="Batch-normalized Keras models from training to fast, verified inference.",
    )
    parser.add_argument("--version", action="version", version=f"bnexport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bnexport.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bnexport.cli.cmd_{name}":
                continue  # subcommand not part of this build
            raise
        cmd = module.add_parser(sub)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnexport`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"bnexport {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (BnexportError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"bnexport {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF_MODULE.get(missing)
        hint = f"pip install 'bnexport[{extra}]'" if extra else f"pip install {missing}"
        print(
            f"bnexport {args.command}: error: {missing} is not installed ({hint})", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print(f"bnexport {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
