"""``bnexport quickstart``: the main job on the built-in digits data set."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``quickstart`` subcommand."""
    parser = sub.add_parser(
        "quickstart",
        help="train, export and verify a BN CNN on the built-in digits data",
        description=(
            "Train a small CNN built with bnexport.BatchNormalization on scikit-learn's "
            "digits (no download), save it as .keras, export it to ONNX with the batch "
            "norms folded, and check parity of the ONNX graph against Keras."
        ),
    )
    parser.add_argument("--out-dir", default="bnexport-out", help="output folder")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--no-export", action="store_true", help="stop after training and saving the model"
    )
    parser.add_argument(
        "--serve", action="store_true", help="then serve the model (KServe v2 over HTTP)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="--serve: bind address")
    parser.add_argument("--port", type=int, default=8000, help="--serve: port")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the quickstart; return 0 when the exported model passes parity."""
    from bnexport.cli.options import console, wants_progress
    from bnexport.cli.progress import StageProgress
    from bnexport.errors import UsageError
    from bnexport.quickstart import run_quickstart

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1. Received: --epochs={args.epochs}")
    if args.serve and args.no_export:
        raise UsageError("--serve needs the exported model; drop --no-export")
    with StageProgress("quickstart", enabled=wants_progress(args)) as progress:
        result = run_quickstart(
            args.out_dir,
            epochs=args.epochs,
            seed=args.seed,
            export=not args.no_export,
            console=console(args),
            progress=progress,
        )
    passed = result.parity_report is None or bool(result.parity_report)
    if args.serve and result.onnx_path is not None:
        from bnexport.serve import ServeSettings, serve_model

        serve_model(result.onnx_path, ServeSettings(host=args.host, port=args.port))
    return 0 if passed else 1
