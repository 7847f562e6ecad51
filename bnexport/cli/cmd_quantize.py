"""``bnexport quantize MODEL -o OUT.onnx --calibration DATA``: an INT8 QDQ graph.

``--calibration`` is not spelled ``--inputs`` (as in ``run``/``parity``) on purpose: it
is the data the activation ranges are computed from, many batches, not the inputs of
one run; held-out data to measure the result on is ``--validation``.
"""

from __future__ import annotations

import argparse

from bnexport.cli.options import add_json, add_model, cli_spelling, console, wants_progress


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
    add_model(parser, "the float32 ONNX model", dest="input")
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
        help="tensorrt (default): symmetric int8 activations and 8-bit weights, "
        "TensorRT-ready; onnxruntime runs it exactly only on CPUs with VNNI/AVX-VNNI/AMX "
        "(elsewhere its int8 kernels saturate: int16 pair sums). cpu: uint8 asymmetric "
        "activations and 7-bit weights (reduce_range, |w| <= 64: no pair sum can leave "
        "int16), correct on every x86 CPU, refused by TensorRT. The CPU's int8 features "
        "are read from /proc/cpuinfo; BNEXPORT_CPU_INT8=vnni|novnni|auto overrides",
    )
    parser.add_argument(
        "--full-range-weights",
        action="store_true",
        help="with --target cpu: 8-bit weights (one more bit; saturates on CPUs without "
        "VNNI/AVX-VNNI/AMX)",
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
        type=_agreement,
        default="auto",
        metavar="FRACTION",
        help="keep the most sensitive nodes in float32, one at a time, until the top-1 "
        "agreement of the Q/DQ graph with float32 reaches FRACTION (e.g. 0.99); 'none': no "
        "target. Default: no search, and a classifier measured on >= 100 rows must reach "
        "0.99 (the verdict uses the quantization error; the host's kernel error is reported "
        "beside it)",
    )
    parser.add_argument(
        "--max-exclude", type=int, default=8, help="most nodes --target-agreement may exclude"
    )
    for flag, text in (
        (
            "--keep-below-target",
            "write the graph even if it misses its target agreement (exit 0, with a warning)",
        ),
        (
            "--allow-unfolded-bn",
            "quantize even if a BN cannot fold (warns with the measured INT8 error)",
        ),
    ):
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="calibration batch size (dynamic batch)"
    )
    add_json(parser)
    return parser


def _agreement(text: str) -> float | str | None:
    """``--target-agreement`` value: a fraction, ``none`` or ``auto``."""
    if text.strip().lower() in ("none", "auto"):
        return None if text.strip().lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a fraction, 'none' or 'auto'. Received: {text!r}"
        ) from None


def _in_cli_spelling(report: object) -> object:
    """The report with its notes and warnings in option spelling (``--validation``)."""
    for field in ("notes", "warnings"):
        lines = getattr(report, field, None)
        if isinstance(lines, list):
            setattr(report, field, [cli_spelling(line) for line in lines])
    return report


def run(args: argparse.Namespace) -> int:
    """Quantize, print the report; 0 on success."""
    import warnings
    from pathlib import Path

    from bnexport.atomic_write import check_output_paths, check_writable, write_text_atomic
    from bnexport.errors import UsageError
    from bnexport.quantize.calibration import load_calibration_files
    from bnexport.quantize.pipeline import quantize
    from bnexport.quantize.verdict import BelowTargetError

    src = Path(args.input)
    inputs = {"MODEL": src}
    for i, path in enumerate([*args.calibration, *(args.validation or [])]):
        inputs[f"data file {i + 1}"] = path
    check_output_paths({"-o/--output": args.output, "--json": args.json}, inputs)
    check_writable(args.output, error=UsageError)  # a missing folder: before the work
    if args.json:
        check_writable(args.json, error=UsageError)
    calibration = load_calibration_files(args.calibration)
    validation = load_calibration_files(args.validation) if args.validation else None
    from bnexport.cli.progress import StageProgress

    out = console(args)
    with (
        warnings.catch_warnings(),
        StageProgress("quantize", enabled=wants_progress(args)) as progress,
    ):
        warnings.simplefilter("ignore", UserWarning)  # the report prints them
        if progress is not None:  # calibration and measuring have no steps to report
            progress("folding, calibrating and measuring", 0, None)
        try:
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
                keep_below_target=args.keep_below_target,
                full_range_weights=args.full_range_weights,
            )
        except BelowTargetError as exc:  # show what was measured, then the one-line error
            if exc.report is not None:
                out.print(_in_cli_spelling(exc.report).table())
            raise
    out.print(_in_cli_spelling(report).table())
    if args.json:
        write_text_atomic(args.json, report.to_json() + "\n")
    return 0
