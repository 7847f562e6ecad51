"""``bnexport fold IN.onnx -o OUT.onnx``: the batch-norm folding pass on any ONNX file."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

from bnexport.cli.options import add_fold_options, add_json, add_model, console, verbosity


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``fold`` subcommand."""
    parser = sub.add_parser(
        "fold",
        help="fold batch normalization in an ONNX file",
        description=(
            "Fold inference BatchNormalization nodes and per-channel constant Mul/Add chains "
            "into neighbouring Conv/ConvTranspose/Gemm/MatMul weights; whatever cannot fold "
            "becomes one node. Prints what became of each BN. OUT.onnx may be MODEL "
            "(folded in place: the input is read first and replaced atomically); any other "
            "output that resolves to an input or to another output is refused."
        ),
    )
    add_model(parser, "the ONNX model to fold", dest="input")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.onnx",
        help="folded model (may be MODEL: folds in place, atomically)",
    )
    add_fold_options(parser)
    add_json(parser)
    return parser


def _load(path: Path) -> Any:
    from bnexport.errors import UsageError
    from bnexport.io.onnx_file import load_onnx

    model = load_onnx(path)
    if not model.graph.node and not model.opset_import:
        raise UsageError(f"{path}: not an ONNX model (empty graph, no opset_import)")
    return model


def _check(model: Any, fused_norm: str) -> None:

    from bnexport.errors import FoldError
    from bnexport.io.onnx_file import check_graph_valid

    if fused_norm == "plugin":
        from bnexport_plugins.fused_norm.onnx_node import register_onnx_schema

        register_onnx_schema()
    check_graph_valid(model, "folded graph", FoldError)


def _print_report(
    records: list, before: int, after: int, out: Path, args: argparse.Namespace
) -> dict[str, int]:
    """One row per BN with ``-v`` (else only those not folded), then the summary line."""
    from rich.table import Table

    counts = collections.Counter(r.action for r in records)
    shown = [r for r in records if verbosity(args) > 0 or r.action in ("fused", "kept")]
    out_console = console(args)
    if shown:
        title = "batch normalizations" if verbosity(args) > 0 else "not folded"
        table = Table(title=title)
        table.add_column("BN", overflow="fold", ratio=3)
        table.add_column("action", no_wrap=True)
        table.add_column("target", overflow="fold", ratio=3)
        table.add_column("reason", overflow="fold", ratio=4)
        for r in shown:
            table.add_row(r.name, r.action, r.target or "-", r.reason)
        out_console.print(table)
    summary = ", ".join(
        f"{counts.get(a, 0)} {a.replace('_', ' ')}"
        for a in ("folded_forward", "folded_backward", "fused", "kept")
    )
    head = f"{len(records)} BN: {summary}" if records else "no batch normalization found"
    out_console.print(
        f"{head}; nodes {before} -> {after}; wrote {out}",
        highlight=False,
        soft_wrap=True,
    )
    return dict(counts)


def run(args: argparse.Namespace) -> int:
    """Load, fold, check and write the model (and the JSON report); return 0."""
    from bnexport.atomic_write import check_output_paths, check_writable, write_bytes_atomic
    from bnexport.errors import UsageError
    from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report

    src, dst = Path(args.input), Path(args.output)
    check_output_paths(
        {"-o/--output": dst, "--json": args.json},
        {"MODEL": src},
        in_place=[("-o/--output", "MODEL")],
    )
    model = _load(src)
    check_writable(dst, error=UsageError)  # fail before the work, creating nothing
    if args.json:
        check_writable(args.json, error=UsageError)
    folded, records = fold_batchnorm_with_report(
        model, fused_norm=args.fused_norm, keep_float16_overflow=args.keep_float16_overflow
    )
    _check(folded, args.fused_norm)
    report = {
        "input": str(src),
        "output": str(dst),
        "fused_norm": args.fused_norm,
        "nodes_before": len(model.graph.node),
        "nodes_after": len(folded.graph.node),
        "records": [r.to_dict() for r in records],
    }
    write_bytes_atomic(dst, folded.SerializeToString())
    counts = _print_report(records, report["nodes_before"], report["nodes_after"], dst, args)
    if args.json:
        report["summary"] = counts
        write_bytes_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0
