"""``bnexport export MODEL -o OUT.onnx``: a Keras model or SavedModel to ONNX, BNs folded."""

from __future__ import annotations

import argparse
from typing import Any

from bnexport.cli.options import (
    add_fold_options,
    add_json,
    add_tolerances,
    add_unsafe_load,
    console,
    parse_input_shapes,
    verbosity,
    wants_progress,
)

#: what ``export`` takes (an ONNX file is already exported: ``fold``/``quantize`` take it)
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = sub.add_parser(
        "export",
        help="export a Keras model / SavedModel to ONNX with batch norm folded",
        description=(
            "Export MODEL (.keras file, tf.keras .h5 file, or SavedModel directory) to ONNX. "
            "Every batch normalization is folded into a neighbouring Conv/Gemm/MatMul where "
            "exact, else becomes one node; the graph is checked and, unless --no-verify, "
            "compared with the model on generated inputs. Prints a summary (BNs by outcome, "
            "the ones that could not fold and why); -v prints one row per BN."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help=".keras / .h5 file or SavedModel dir")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (13-21, default 17)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="weights and compute dtype (float16: folded first, then converted)",
    )
    parser.add_argument(
        "--io-dtype",
        choices=("float32", "float16"),
        default=None,
        help="dtype of float graph inputs/outputs (default: --dtype)",
    )
    parser.add_argument(
        "--static-batch",
        action="store_true",
        help="fix the batch dimension (the model's, or 1) instead of a dynamic one",
    )
    add_fold_options(parser)
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DxDx...",
        help="fix an input's shape, e.g. image:1x224x224x3 (repeat per input; -1 keeps a "
        "dimension dynamic; NAME: may be left out for a single-input model). The batch "
        "dimension given here replaces the dynamic 'batch' dimension",
    )
    parser.add_argument(
        "--int8",
        nargs="+",
        metavar="CALIB",
        help="calibration data (.npy for one input, .npz keyed by input name; each file one "
        "or more batches): write the INT8 QDQ graph of the folded model instead "
        "(see bnexport quantize for the options)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "keras", "tf2onnx"),
        default="auto",
        help="exporter: the Keras-native emitter where it applies, else tf2onnx for the "
        "whole model (auto, default); or force keras / tf2onnx. The report says which ran",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison run")
    add_tolerances(parser, note="of the verification run, which --no-verify skips")
    add_unsafe_load(parser)
    add_json(parser)
    return parser


def _check_model_path(model: str) -> None:
    """Refuse, before TensorFlow loads, a MODEL that ``export`` cannot take (exit 2)."""
    from pathlib import Path

    from bnexport.errors import FileMissingError, ModelFileError

    path = Path(model)
    if not path.exists():
        raise FileMissingError(f"{model}: no such file or directory")
    if path.is_dir() or path.suffix.lower() in KERAS_SUFFIXES:
        return
    if path.suffix.lower() == ".onnx":
        raise ModelFileError(
            f"{model} is an ONNX file, already exported; export takes a Keras model "
            "(.keras, .h5 or a SavedModel folder). For an ONNX file use bnexport fold "
            "(fold batch norms) or bnexport quantize"
        )
    raise ModelFileError(
        f"{model}: not a Keras model; expected a .keras or .h5 file or a SavedModel folder"
    )


def _calibration(args: argparse.Namespace) -> Any:
    if not args.int8:
        return None
    from bnexport.quantize.calibration import load_calibration_files

    return load_calibration_files(args.int8)


def run(args: argparse.Namespace) -> int:
    """Export, print the summary (``-v``: one row per BN); 0 on success."""
    from bnexport.cli.progress import StageProgress
    from bnexport.errors import UsageError

    if not 13 <= args.opset <= 21:
        raise UsageError(f"--opset must be in [13, 21]. Received: --opset={args.opset}")
    if args.io_dtype == "float16" and args.dtype != "float16":
        raise UsageError("--io-dtype float16 needs --dtype float16")
    if args.int8 and (args.dtype != "float32" or args.fused_norm != "onnx"):
        raise UsageError("--int8 needs --dtype float32 and --fused-norm onnx (the default)")
    input_shapes = parse_input_shapes(args.input_shape)
    from bnexport.atomic_write import check_output_paths, check_writable, write_text_atomic

    data = {f"--int8 file {i + 1}": p for i, p in enumerate(args.int8 or [])}
    check_output_paths(
        {"-o/--output": args.output, "--json": args.json}, {"MODEL": args.model, **data}
    )
    _check_model_path(args.model)
    check_writable(args.output, error=UsageError)  # a missing folder: before the work
    if args.json:
        check_writable(args.json, error=UsageError)
    calibration = _calibration(args)

    from bnexport.compose import export

    out = console(args)
    with StageProgress("export", enabled=wants_progress(args)) as progress:
        report = export(
            args.model,
            args.output,
            opset=args.opset,
            dtype=args.dtype,
            io_dtype=args.io_dtype,
            dynamic_batch=not args.static_batch,
            fused_norm=args.fused_norm,
            verify=not args.no_verify,
            verify_rtol=args.rtol,
            verify_atol=args.atol,
            verify_range_rtol=args.range_rtol,
            keep_float16_overflow=args.keep_float16_overflow,
            safe_mode=not args.unsafe_load,
            int8=calibration,
            input_shapes=input_shapes,
            progress=progress,
            engine=args.engine,
        )
    out.print(report.table() if verbosity(args) > 0 else report.summary_view())
    if args.json:
        write_text_atomic(args.json, report.to_json() + "\n")
    return 0
