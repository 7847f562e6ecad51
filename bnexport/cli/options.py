"""Options shared by several commands, declared once (Polygraphy's ``tools/args`` pattern).

One concept, one spelling, one help text: a command adds the group it needs instead of
declaring its own copy, so ``export`` and ``fold`` cannot drift apart on ``--fused-norm``.

The vocabulary (``bnexport <command> --help`` shows it; old spellings stay accepted as
hidden aliases for one release):

- ``MODEL``: the positional model argument of every command (``IN.onnx`` / ``model``
  before);
- ``--inputs DATA``: the inputs to run on (``run --input/-i`` before); ``quantize``
  keeps ``--calibration``, a different concept (data the scales are computed from, not
  the inputs of one run), with ``--validation`` for held-out data;
- ``--json REPORT.json``: write the command's report as JSON (``parity --report`` before);
- ``--backend``: ``auto``, ``onnxruntime`` or ``tensorrt`` wherever it picks the
  runtime (``triton-repo --backend`` names a Triton backend: a different concept);
- ``--precision fp32|fp16``: the precision TensorRT builds the engine in;
- ``-q/--quiet``, ``-v/--verbose``, ``--debug``: on every command (:func:`add_common`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

#: runtime backends (``bnexport.runtime.session.BACKENDS``; not imported: keeps --help fast)
BACKENDS = ("auto", "onnxruntime", "tensorrt")
BACKEND_HELP = (
    "auto (TensorRT where it is installed and --device cuda, else onnxruntime), "
    "onnxruntime, or tensorrt"
)
PRECISION_HELP = (
    "precision of the TensorRT engine: fp32 (default) or fp16 (TensorRT may pick half "
    "precision kernels per layer). onnxruntime runs the graph in its stored dtypes: fp16 "
    "needs --device cuda (TensorRT execution provider)"
)
DEBUG_ENV = "BNEXPORT_DEBUG"
DEBUG_HELP = f"show the traceback of expected errors (same exit code), or set {DEBUG_ENV}=1"


def add_common(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``-q/--quiet``, ``-v/--verbose`` and ``--debug`` (before or after the command).

    On a subcommand the defaults are suppressed, so a flag given before the command
    (``bnexport -v export ...``) is not reset by the subcommand's parser.
    """
    default: Any = {} if top_level else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("output")
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        help="print less: no tables, summaries or progress (errors still print)",
        **({"default": 0} if top_level else default),
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="print more: full tables (export: one row per batch norm), and TensorFlow's "
        "own log lines (silenced by default)",
        **({"default": 0} if top_level else default),
    )
    group.add_argument(
        "--debug",
        action="store_true",
        help=DEBUG_HELP,
        **({"default": False} if top_level else default),
    )


def verbosity(args: argparse.Namespace) -> int:
    """``-v`` count minus ``-q`` count: < 0 quiet, 0 default, > 0 verbose."""
    return int(getattr(args, "verbose", 0) or 0) - int(getattr(args, "quiet", 0) or 0)


def console(args: argparse.Namespace, *, stderr: bool = False) -> Any:
    """A ``rich`` console for the command's output, silent with ``-q``.

    Rich sizes it to the terminal; when the output is piped it is 80 columns (or
    ``$COLUMNS``), so tables are laid out for that width.
    """
    from rich.console import Console

    return Console(stderr=stderr, quiet=verbosity(args) < 0, highlight=False)


def wants_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal (stderr) and not with ``-q``."""
    return verbosity(args) >= 0 and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def add_model(parser: argparse.ArgumentParser, help: str, *, dest: str = "model") -> None:  # noqa: A002
    """The positional ``MODEL`` argument."""
    parser.add_argument(dest, metavar="MODEL", help=help)


INPUTS_HELP = (
    "x.npy (a model with one input) or data.npz (one array per input name); "
    "loaded without unpickling"
)


def add_inputs(parser: argparse.ArgumentParser | Any, *, aliases: tuple[str, ...] = ()) -> None:
    """``--inputs DATA`` (``.npy`` for one input, ``.npz`` keyed by input name).

    ``aliases`` are older spellings, accepted but not shown in ``--help``. A command
    that needs the option checks it is there itself (argparse's ``required`` would not
    see an alias).
    """
    parser.add_argument("--inputs", dest="inputs", metavar="DATA", help=INPUTS_HELP)
    for alias in aliases:
        parser.add_argument(alias, dest="inputs", metavar="DATA", help=argparse.SUPPRESS)


def add_json(parser: argparse.ArgumentParser, *, aliases: tuple[str, ...] = ()) -> None:
    """``--json REPORT.json``: also write the command's report as JSON."""
    parser.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    for alias in aliases:
        parser.add_argument(alias, dest="json", metavar="REPORT.json", help=argparse.SUPPRESS)


def add_backend(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """``--backend``: the runtime (one, or comma-separated for ``parity``)."""
    if several:
        parser.add_argument(
            "--backend",
            default="onnxruntime",
            metavar="BACKEND[,BACKEND]",
            help=f"comma-separated backends to compare, each {BACKEND_HELP}; default onnxruntime",
        )
    else:
        parser.add_argument(
            "--backend", choices=BACKENDS, default="auto", help=f"{BACKEND_HELP}; default auto"
        )


def add_precision(parser: argparse.ArgumentParser) -> None:
    """``--precision fp32|fp16``."""
    parser.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32", help=PRECISION_HELP
    )


def add_fold_options(parser: argparse.ArgumentParser) -> None:
    """``--fused-norm`` and ``--keep-float16-overflow`` (``export`` and ``fold``)."""
    parser.add_argument(
        "--fused-norm",
        choices=("onnx", "plugin"),
        default="onnx",
        help="a batch norm that cannot fold becomes one standard ONNX node (onnx, default) "
        "or one bnexport::FusedNorm node for the TensorRT plugin (plugin)",
    )
    parser.add_argument(
        "--keep-float16-overflow",
        choices=("float32", "error"),
        default="float32",
        help="float16 graphs: keep an op whose folded weights overflow float16 in float32 "
        "(default) or fail naming the layer",
    )


def add_unsafe_load(parser: argparse.ArgumentParser) -> None:
    """``--unsafe-load``: allow a Keras file whose loading runs Python code."""
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load a model file even if that runs Python code stored in it (a Lambda "
        "layer's lambda); refused by default. Only for files you trust",
    )


#: the defaults of :mod:`bnexport.tolerance`, spelled once for every command's --help
TOLERANCE_DEFAULTS = "float32 1e-4 / 1e-4 / 1e-5, float16 2e-2 / 2e-2 / 1e-3"


def add_tolerances(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    """``--rtol``, ``--atol``, ``--range-rtol``: the one tolerance policy.

    An element passes when ``|got - ref| <= atol + rtol*|ref| + range_rtol*max|ref|``
    (``max|ref|`` of its output channel; :mod:`bnexport.tolerance`). Default ``None``:
    the row of the precision the candidate ran in. ``note`` ends the ``--rtol`` help
    (what the command compares, a different criterion it applies).
    """
    group = parser.add_argument_group(
        "tolerance",
        "an element passes when |got - ref| <= atol + rtol*|ref| + range_rtol*max|ref| "
        "(max|ref| of its output channel). Defaults by precision (rtol / atol / "
        f"range-rtol): {TOLERANCE_DEFAULTS}; see bnexport.tolerance",
    )
    group.add_argument(
        "--rtol", type=float, default=None, help=f"relative tolerance{note and '; ' + note}"
    )
    group.add_argument("--atol", type=float, default=None, help="absolute tolerance")
    group.add_argument(
        "--range-rtol",
        type=float,
        default=None,
        help="tolerance relative to each output channel's max|ref| (0 turns it off)",
    )


#: Python keyword spelling -> option spelling, for library messages the CLI prints
_CLI_SPELLING = (
    ("pass validation= ", "pass --validation DATA "),
    ("validation=", "--validation "),
)


def cli_spelling(text: str) -> str:
    """A library message with Python keywords (``validation=``) in option spelling.

    Only whole keywords are rewritten (not preceded by a letter, digit, ``_`` or ``-``),
    so an option already spelled ``--validation`` is left as it is.
    """
    import re

    for python, option in _CLI_SPELLING:
        text = re.sub(rf"(?<![\w-]){re.escape(python)}", option, text)
    return text


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int | None, ...]] | None:
    """``["image:1x224x224x3", ...]`` -> ``{"image": (1, 224, 224, 3)}``.

    A dimension written ``-1``, ``?`` or ``batch`` stays dynamic (``None``). Without
    ``NAME:`` the shape applies to the only input (key ``""``).

    Raises:
        UsageError: a malformed spec (names it).
    """
    from bnexport.errors import UsageError

    if not specs:
        return None
    shapes: dict[str, tuple[int | None, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep:
            name, dims = "", spec
        try:
            shape = tuple(
                None if d.strip() in ("-1", "?", "batch") else int(d) for d in dims.split("x")
            )
        except ValueError:
            shape = ()
        if not shape or any(d is not None and d < 1 for d in shape):
            raise UsageError(
                "--input-shape takes NAME:DxDx... with positive dimensions (-1 for dynamic), "
                f"e.g. image:1x224x224x3. Received: {spec!r}"
            )
        if name in shapes:
            raise UsageError(f"--input-shape given twice for {name or 'the input'!r}")
        shapes[name] = shape
    return shapes
