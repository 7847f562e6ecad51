"""``bnexport run``: run an ONNX model on inputs from a ``.npy`` / ``.npz`` file."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand."""
    parser = sub.add_parser(
        "run",
        help="run an exported ONNX model (onnxruntime or TensorRT) on .npy/.npz inputs",
        description=(
            "Run MODEL.onnx with bnexport.Session. --input is a .npy file (single-input "
            "models) or a .npz file with one array per input name. Outputs go to --output "
            "(.npz, one array per output name) or are summarized on stdout. --output may not "
            "be MODEL or the --input file."
        ),
    )
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--input", "-i", required=True, help="x.npy or data.npz")
    parser.add_argument("--output", "-o", help="write outputs to this .npz file")
    parser.add_argument(
        "--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto", help="backend"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--max-batch", type=int, help="split larger batches into this size")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the model; 0 on success (errors are raised for ``main`` to report)."""
    import io
    import os
    from pathlib import Path

    import numpy as np

    from bnexport.atomic_write import check_output_paths, write_bytes_atomic
    from bnexport.errors import InputError, UsageError
    from bnexport.io.arrays import load_arrays
    from bnexport.runtime.session import Session

    check_output_paths(
        {"-o/--output": args.output}, {"MODEL": args.model, "-i/--input": args.input}
    )
    if os.path.isdir(args.model):
        raise UsageError(f"{args.model}: is a folder, not an ONNX file")
    if not os.path.isfile(args.model):
        raise UsageError(f"ONNX model not found: {args.model}")
    if args.output is not None and not args.output.endswith(".npz"):
        raise UsageError(f"--output must end in .npz. Received: {args.output}")
    if args.output is not None and not Path(args.output).parent.resolve().is_dir():
        raise UsageError(f"--output folder does not exist: {Path(args.output).parent}")
    feed = load_arrays(args.input)
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
                f"{args.input} holds one array but the model has {len(sess.inputs)} inputs "
                f"({names}); pass a .npz keyed by input name"
            )
        feed = {sess.inputs[0].name: feed[""]}
    try:
        outputs = sess.run(feed)
    except InputError as exc:
        raise UsageError(str(exc)) from exc
    if args.output is not None:
        buf = io.BytesIO()
        np.savez(buf, **outputs)
        write_bytes_atomic(args.output, buf.getvalue(), make_parents=True)
        print(f"wrote {len(outputs)} output(s) to {args.output}")
        return 0
    for name, arr in outputs.items():
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        stats = (
            f"min {finite.min():.4g} max {finite.max():.4g} mean {finite.mean():.4g}"
            if finite.size
            else "no finite values"
        )
        print(f"{name}: {arr.dtype.name}{list(arr.shape)} {stats}")
    return 0
