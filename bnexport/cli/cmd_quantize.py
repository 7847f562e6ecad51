"""``bnexport quantize IN.onnx -o OUT.onnx --calibration DATA``: an INT8 QDQ graph."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``quantize`` subcommand."""
    parser = sub.add_parser(
        "quantize",
        help="quantize an ONNX model to INT8 (BNs folded first, calibrated, measured)",
        description=(
            "Fold every batch normalization, calibrate on the given data and write an INT8 "
            "QDQ graph (symmetric int8 per-channel weights, symmetric int8 per-tensor "
            "activations, Q/DQ on Conv/ConvTranspose/Gemm/MatMul inputs) that onnxruntime "
            "runs and TensorRT's explicit quantization takes. Prints the top-1 agreement and "
            "output error against the float32 graph."
        ),
    )
    parser.add_argument("input", metavar="IN.onnx", help="float32 ONNX model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="INT8 model")
    parser.add_argument(
        "--calibration",
        required=True,
        nargs="+",
        metavar="DATA",
        help=".npy (single-input model) or .npz (one array per input name) files; each file "
        "is one or more batches (loaded with allow_pickle=False)",
    )
    parser.add_argument(
        "--validation",
        nargs="+",
        metavar="DATA",
        help="held-out .npy/.npz data to measure the INT8 graph on (default: the calibration)",
    )
    parser.add_argument(
        "--method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="calibration method (default minmax)",
    )
    parser.add_argument("--percentile", type=float, default=99.999, help="for --method percentile")
    parser.add_argument(
        "--target",
        choices=("tensorrt", "cpu"),
        default="tensorrt",
        help="tensorrt (default): symmetric int8 activations, TensorRT-ready, runs on "
        "onnxruntime too; cpu: uint8 asymmetric activations, faster on onnxruntime x86 CPU, "
        "refused by TensorRT",
    )
    parser.add_argument(
        "--per-tensor", action="store_true", help="one weight scale per tensor (not per channel)"
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="NODE",
        help="ONNX node names to keep in float32",
    )
    parser.add_argument(
        "--target-agreement",
        type=float,
        metavar="FRACTION",
        help="keep the most sensitive nodes in float32, one at a time, until the top-1 "
        "agreement with float32 reaches FRACTION (e.g. 0.99)",
    )
    parser.add_argument(
        "--max-exclude", type=int, default=8, help="most nodes --target-agreement may exclude"
    )
    parser.add_argument(
        "--allow-unfolded-bn",
        action="store_true",
        help="quantize even if a BN cannot fold (warns with the measured INT8 error)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="calibration batch size (dynamic batch)"
    )
    parser.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """Quantize, print the report; 0 on success."""
    import warnings
    from pathlib import Path

    from rich.console import Console

    from bnexport.atomic_write import check_output_paths, check_writable, write_text_atomic
    from bnexport.errors import UsageError
    from bnexport.quantize.calibration import load_calibration_files
    from bnexport.quantize.pipeline import quantize

    src = Path(args.input)
    inputs = {"IN.onnx": src}
    for i, path in enumerate([*args.calibration, *(args.validation or [])]):
        inputs[f"data file {i + 1}"] = path
    check_output_paths({"-o/--output": args.output, "--json": args.json}, inputs)
    if args.json:
        check_writable(args.json, error=UsageError)
    calibration = load_calibration_files(args.calibration)
    validation = load_calibration_files(args.validation) if args.validation else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the report prints them
        report = quantize(
            src,
            args.output,
            calibration,
            method=args.method,
            per_channel=not args.per_tensor,
            exclude=args.exclude,
            percentile=args.percentile,
            target=args.target,
            validation=validation,
            target_agreement=args.target_agreement,
            max_exclude=args.max_exclude,
            allow_unfolded_bn=args.allow_unfolded_bn,
            batch_size=args.batch_size,
        )
    Console().print(report.table())
    if args.json:
        write_text_atomic(args.json, report.to_json() + "\n")
    return 0
