"""``bnexport run``: run an ONNX model on inputs from a ``.npy`` / ``.npz`` file."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from bnexport.cli.options import add_backend, add_inputs, add_model, add_precision, verbosity


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand."""
    parser = sub.add_parser(
        "run",
        help="run an exported ONNX model (onnxruntime or TensorRT) on .npy/.npz inputs",
        description=(
            "Run MODEL (.onnx) with bnexport.Session. --inputs is a .npy file (single-input "
            "models) or a .npz file with one array per input name. Outputs go to --output "
            "(.npz, one array per output name) or are summarized on stdout. --output may not "
            "be MODEL or the --inputs file. The model runs --warmup times untimed, then "
            "--runs times; the latency of those runs is printed (median, p90, min, mean), "
            "as trtexec and Polygraphy do."
        ),
    )
    add_model(parser, "the .onnx file")
    add_inputs(parser, aliases=("--input", "-i"))  # required, checked in run()
    parser.add_argument("--output", "-o", help="write outputs to this .npz file")
    add_backend(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    add_precision(parser)
    parser.add_argument(
        "--runs", type=int, default=10, help="timed runs for the latency figures (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs before them (default 1: first-run allocations and engine setup "
        "are not latency)",
    )
    parser.add_argument("--max-batch", type=int, help="split larger batches into this size")
    return parser


def latency_line(seconds: list[float], warmup: int) -> str:
    """Two lines: ``latency: median .. ms, p90 .. ms, min .. ms, mean .. ms`` and the counts.

    p90 is NumPy's linear-interpolation percentile of the timed runs; the ``warmup``
    runs before them are not counted.
    """
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return (
        f"latency: median {np.median(ms):.3f} ms, p90 {np.percentile(ms, 90):.3f} ms, "
        f"min {ms.min():.3f} ms, mean {ms.mean():.3f} ms\n"
        f"  ({len(ms)} timed run(s); {warmup} warmup run(s) excluded)"
    )


def _timed_runs(
    sess: Any, feed: dict, runs: int, warmup: int, clock: Callable[[], float] | None = None
) -> tuple[dict, list[float]]:
    """Run ``warmup`` untimed then ``runs`` timed; ``(last outputs, seconds per run)``."""
    import time

    clock = clock or time.perf_counter
    outputs: dict = {}
    for _ in range(warmup):
        outputs = sess.run(feed)
    seconds = []
    for _ in range(runs):
        start = clock()
        outputs = sess.run(feed)
        seconds.append(clock() - start)
    return outputs, seconds


def run(args: argparse.Namespace) -> int:
    """Run the model, print the outputs' summary and the latency; 0 on success."""
    import io
    import os
    from pathlib import Path

    import numpy as np

    from bnexport.atomic_write import check_output_paths, write_bytes_atomic
    from bnexport.errors import InputError, UsageError
    from bnexport.io.arrays import load_arrays
    from bnexport.runtime.session import Session

    if args.inputs is None:
        raise UsageError("--inputs DATA is required (x.npy or data.npz)")
    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1. Received: --runs={args.runs}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0. Received: --warmup={args.warmup}")
    check_output_paths({"-o/--output": args.output}, {"MODEL": args.model, "--inputs": args.inputs})
    if os.path.isdir(args.model):
        raise UsageError(f"{args.model}: is a folder, not an ONNX file")
    if not os.path.isfile(args.model):
        raise UsageError(f"ONNX model not found: {args.model}")
    if args.output is not None and not args.output.endswith(".npz"):
        raise UsageError(f"--output must end in .npz. Received: {args.output}")
    if args.output is not None and not Path(args.output).parent.resolve().is_dir():
        raise UsageError(f"--output folder does not exist: {Path(args.output).parent}")
    feed = load_arrays(args.inputs)
    sess = Session(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        max_batch=args.max_batch,
    )
    if list(feed) == [""]:
        if len(sess.inputs) != 1:
            names = ", ".join(i.name for i in sess.inputs)
            raise UsageError(
                f"{args.inputs} holds one array but the model has {len(sess.inputs)} inputs "
                f"({names}); pass a .npz keyed by input name"
            )
        feed = {sess.inputs[0].name: feed[""]}
    try:
        outputs, seconds = _timed_runs(sess, feed, args.runs, args.warmup)
    except InputError as exc:
        raise UsageError(str(exc)) from exc
    quiet = verbosity(args) < 0
    if args.output is not None:
        buf = io.BytesIO()
        np.savez(buf, **outputs)
        write_bytes_atomic(args.output, buf.getvalue(), make_parents=True)
        if not quiet:
            print(f"wrote {len(outputs)} output(s) to {args.output}")
    else:
        for name, arr in outputs.items():
            finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
            stats = (
                f"min {finite.min():.4g} max {finite.max():.4g} mean {finite.mean():.4g}"
                if finite.size
                else "no finite values"
            )
            print(f"{name}: {arr.dtype.name}{list(arr.shape)} {stats}")
    if not quiet:
        print(latency_line(seconds, args.warmup))
    return 0
