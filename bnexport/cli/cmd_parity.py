"""``bnexport parity``: prove (or disprove) that an exported model matches its Keras model.

Exit codes: 0 every output within tolerance, 1 not (or a backend could not
run), 2 usage error. Usable as a CI gate.
"""

from __future__ import annotations

import argparse

_TOLERANCE_HELP = (
    "default by precision (bnexport.tolerance): fp32 rtol 1e-4 / atol 1e-4, fp16 2e-2 / 2e-2 "
    "(pass criterion |onnx - keras| <= atol + rtol*|keras| for every element); INT8 (QDQ) "
    "graphs pass on top-1 agreement (--min-top1) and cosine >= 0.99 instead"
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
    parser.add_argument("model", help="the Keras model: .keras, .h5 or a SavedModel directory")
    parser.add_argument("onnx", help="the exported .onnx file")
    parser.add_argument(
        "--backend",
        default="onnxruntime",
        help="comma-separated backends: onnxruntime,tensorrt (default onnxruntime)",
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--inputs", help="data.npz (one array per input) or x.npy")
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
    parser.add_argument("--rtol", type=float, help=f"relative tolerance ({_TOLERANCE_HELP})")
    parser.add_argument("--atol", type=float, help="absolute tolerance (see --rtol)")
    parser.add_argument(
        "--check",
        choices=("elementwise", "max", "mean", "quantile", "agreement"),
        default=None,
        help="pass criterion (default: agreement for INT8 graphs, elementwise otherwise)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32", help="TensorRT precision"
    )
    parser.add_argument(
        "--min-top1",
        type=float,
        metavar="FRACTION",
        help="INT8 graphs: top-1 agreement with Keras needed on class-score outputs (default 0.99)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random samples")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load a model file even if that runs Python code stored in it (a Lambda "
        "layer's lambda); refused by default. Only for files you trust",
    )
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--html", help="write the HTML report (per-layer error plot) here")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parity check; returns 0 (pass) or 1 (fail)."""
    import os
    from pathlib import Path

    from bnexport.errors import UsageError

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("onnxruntime", "tensorrt")]
    if bad or not backends:
        raise UsageError(
            "--backend takes onnxruntime and/or tensorrt, comma-separated. "
            f"Received: {args.backend}"
        )
    if args.min_top1 is not None and not 0.0 <= args.min_top1 <= 1.0:
        raise UsageError(f"--min-top1 must be in [0, 1]. Received: --min-top1={args.min_top1}")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be >= 1. Received: --samples={args.samples}")
    for flag in ("rtol", "atol"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag} must be >= 0. Received: --{flag}={value}")
    from bnexport.atomic_write import check_output_paths

    check_output_paths(
        {"--report": args.report, "--html": args.html},
        {"MODEL": args.model, "ONNX": args.onnx, "--inputs": args.inputs},
    )
    if not os.path.exists(args.model):
        raise UsageError(f"Keras model not found: {args.model}")
    if not os.path.isfile(args.onnx):
        raise UsageError(f"ONNX model not found: {args.onnx}")
    for flag in ("report", "html"):
        value = getattr(args, flag)
        if value is not None and not Path(value).parent.resolve().is_dir():
            raise UsageError(f"--{flag}: folder does not exist: {Path(value).parent}")

    from rich.console import Console

    from bnexport.parity.check import DEFAULT_SAMPLES, check_parity

    report = check_parity(
        args.model,
        args.onnx,
        backends=backends,
        inputs=args.inputs,
        samples=args.samples or DEFAULT_SAMPLES,
        per_layer=args.per_layer,
        rtol=args.rtol,
        atol=args.atol,
        check=args.check,
        min_top1=args.min_top1,
        precision=args.precision,
        training_mode=args.training_mode,
        seed=args.seed,
        safe_mode=not args.unsafe_load,
    )
    console = Console()
    report.print(console)
    if args.report:
        report.write_json(args.report)
        console.print(f"JSON report: {args.report}")
    if args.html:
        report.write_html(args.html)
        console.print(f"HTML report: {args.html}")
    return 0 if report.passed else 1
