"""``bnexport parity``: prove (or disprove) that an exported model matches its Keras model.

Exit codes: 0 every output within tolerance, 1 not (or a backend failed while
running), 2 usage error or an unusable request (a backend that is not installed, two
models that do not take the same inputs). Usable as a CI gate.
"""

from __future__ import annotations

import argparse

from bnexport.cli.options import (
    add_backend,
    add_inputs,
    add_json,
    add_model,
    add_precision,
    add_tolerances,
    add_unsafe_load,
    console,
    verbosity,
    wants_progress,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``parity`` subcommand."""
    parser = sub.add_parser(
        "parity",
        help="compare an exported ONNX model with its Keras model, per output and per layer",
        description=(
            "Run the Keras model (training=False, the reference) and the exported ONNX "
            "model on each backend with the same inputs; report max abs/rel error, mean "
            "abs error, cosine similarity, error percentiles and top-1/top-5 agreement per "
            "output. Exit 0 when within tolerance, 1 when not, 2 on usage errors."
        ),
    )
    add_model(parser, "the Keras model (the reference): .keras, .h5 or a SavedModel folder")
    parser.add_argument("onnx", metavar="ONNX", help="the exported .onnx file")
    add_backend(parser, several=True)
    src = parser.add_mutually_exclusive_group()
    add_inputs(src)
    src.add_argument(
        "--samples",
        type=int,
        help="generated samples (default 8; images uniform in [-1, 1), other floats N(0,1))",
    )
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also compare every layer mapped to an ONNX tensor; name the first divergence "
        "(INT8 graphs: rank the layers by the error they add, with the ONNX nodes to "
        "pass to bnexport quantize --exclude)",
    )
    parser.add_argument(
        "--training-mode",
        action="store_true",
        help="also check each BN layer with training=True against FusedNorm batch_stats",
    )
    add_tolerances(
        parser,
        note="INT8 (QDQ) graphs pass on top-1 agreement (--min-top1) and cosine >= 0.99 instead",
    )
    parser.add_argument(
        "--check",
        choices=("elementwise", "max", "mean", "quantile", "agreement"),
        default=None,
        help="pass criterion (default: agreement for INT8 graphs, elementwise otherwise)",
    )
    add_precision(parser)
    parser.add_argument(
        "--min-top1",
        type=float,
        metavar="FRACTION",
        help="INT8 graphs: top-1 agreement with Keras needed on class-score outputs (default 0.99)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random samples")
    add_unsafe_load(parser)
    add_json(parser, aliases=("--report",))
    parser.add_argument("--html", help="write the HTML report (per-layer error plot) here")
    return parser


def _backends(text: str) -> list[str]:
    """``--backend a,b`` -> the backends to compare; ``auto`` is what ``run`` would pick.

    Raises:
        UsageError: an unknown name.
        MissingExtraError: ``tensorrt`` asked for and not installed (exit 2, with the
            extra to install), checked before any model is loaded.
    """
    from bnexport.cli.options import BACKENDS
    from bnexport.errors import UsageError

    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise UsageError(
            f"--backend takes {', '.join(BACKENDS)}, comma-separated. Received: {text}"
        )
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    resolved = ["tensorrt" if b == "auto" and has_trt else b for b in names]
    resolved = ["onnxruntime" if b == "auto" else b for b in resolved]
    if "tensorrt" in resolved and not has_trt:
        from bnexport.runtime.trt_build import import_tensorrt

        import_tensorrt()  # raises MissingExtraError naming bnexport[tensorrt]
    return list(dict.fromkeys(resolved))


def run(args: argparse.Namespace) -> int:
    """Run the parity check; returns 0 (pass) or 1 (fail)."""
    import os
    from pathlib import Path

    from bnexport.errors import UsageError

    backends = _backends(args.backend)
    if args.min_top1 is not None and not 0.0 <= args.min_top1 <= 1.0:
        raise UsageError(f"--min-top1 must be in [0, 1]. Received: --min-top1={args.min_top1}")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be >= 1. Received: --samples={args.samples}")
    for flag in ("rtol", "atol", "range_rtol"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            name = flag.replace("_", "-")
            raise UsageError(f"--{name} must be >= 0. Received: --{name}={value}")
    from bnexport.atomic_write import check_output_paths

    check_output_paths(
        {"--json": args.json, "--html": args.html},
        {"MODEL": args.model, "ONNX": args.onnx, "--inputs": args.inputs},
    )
    if not os.path.exists(args.model):
        raise UsageError(f"Keras model not found: {args.model}")
    if not os.path.isfile(args.onnx):
        raise UsageError(f"ONNX model not found: {args.onnx}")
    for flag in ("json", "html"):
        value = getattr(args, flag)
        if value is not None and not Path(value).parent.resolve().is_dir():
            raise UsageError(f"--{flag}: folder does not exist: {Path(value).parent}")

    from bnexport.cli.progress import StageProgress
    from bnexport.parity.check import DEFAULT_SAMPLES, check_parity

    with StageProgress("parity", enabled=wants_progress(args)) as progress:
        if progress is not None:  # check_parity has no steps to report: a spinner
            progress("running the Keras model and each backend", 0, None)
        report = check_parity(
            args.model,
            args.onnx,
            backends=backends,
            inputs=args.inputs,
            samples=args.samples or DEFAULT_SAMPLES,
            per_layer=args.per_layer,
            rtol=args.rtol,
            atol=args.atol,
            range_rtol=args.range_rtol,
            check=args.check,
            min_top1=args.min_top1,
            precision=args.precision,
            training_mode=args.training_mode,
            seed=args.seed,
            safe_mode=not args.unsafe_load,
        )
    out = console(args)
    if verbosity(args) < 0:
        print(f"parity: {'PASS' if report.passed else 'FAIL'}")
    report.print(out)
    if args.json:
        report.write_json(args.json)
        out.print(f"JSON report: {args.json}")
    if args.html:
        report.write_html(args.html)
        out.print(f"HTML report: {args.html}")
    return 0 if report.passed else 1
