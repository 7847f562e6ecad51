"""``bnexport export MODEL -o OUT.onnx``: a Keras model or SavedModel to ONNX, BNs folded."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = sub.add_parser(
        "export",
        help="export a Keras model / SavedModel to ONNX with batch norm folded",
        description=(
            "Export MODEL (.keras file, tf.keras .h5 file, or SavedModel directory) to ONNX. "
            "Every batch normalization is folded into a neighbouring Conv/Gemm/MatMul where "
            "exact, else becomes one node; the graph is checked and, unless --no-verify, "
            "compared with the model on generated inputs. Prints what became of each BN."
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
    parser.add_argument(
        "--fused-norm",
        choices=("onnx", "plugin"),
        default="onnx",
        help="an unfoldable BN becomes one ONNX op (onnx, default) or one bnexport::FusedNorm "
        "node for the TensorRT plugin (plugin)",
    )
    parser.add_argument(
        "--keep-float16-overflow",
        choices=("float32", "error"),
        default="float32",
        help="float16: keep an op whose folded weights overflow float16 in float32 "
        "(default) or fail naming the layer",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison run")
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="verification: relative tolerance (default: the dtype's, see bnexport.tolerance)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=None,
        help="verification: absolute tolerance (default: the dtype's)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load a model file even if that runs Python code stored in it (a Lambda "
        "layer's lambda); refused by default. Only for files you trust",
    )
    parser.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """Export, print the report table; 0 on success."""
    from pathlib import Path

    from bnexport.errors import UsageError

    if not 13 <= args.opset <= 21:
        raise UsageError(f"--opset must be in [13, 21]. Received: --opset={args.opset}")
    if args.io_dtype == "float16" and args.dtype != "float16":
        raise UsageError("--io-dtype float16 needs --dtype float16")
    from bnexport.atomic_write import check_output_paths, check_writable, write_text_atomic

    check_output_paths({"-o/--output": args.output, "--json": args.json}, {"MODEL": args.model})
    if not Path(args.model).exists():
        raise UsageError(f"{args.model}: no such file or directory")
    if args.json:
        check_writable(args.json)

    from rich.console import Console

    from bnexport.export.keras_export import export

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
        keep_float16_overflow=args.keep_float16_overflow,
        safe_mode=not args.unsafe_load,
    )
    Console(soft_wrap=False).print(report.table())
    if args.json:
        write_text_atomic(args.json, report.to_json() + "\n")
    return 0
