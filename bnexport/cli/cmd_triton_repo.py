"""``bnexport triton-repo``: write a Triton Inference Server model repository."""

from __future__ import annotations

import argparse

from bnexport.cli.options import add_model
from bnexport.serve.settings import ServeSettings

#: the server's defaults: a repository batches as ``bnexport serve`` does by default
D = ServeSettings()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``triton-repo`` subcommand."""
    parser = sub.add_parser(
        "triton-repo",
        help="write a Triton model repository (config.pbtxt validated) for scale-out",
        description=(
            "Write OUT_DIR/<model>/config.pbtxt and OUT_DIR/<model>/1/model.onnx (or model.plan "
            "for --backend tensorrt) with inputs/outputs, dynamic batching and instance groups; "
            "the config is validated with Triton's model-config protobuf. Optionally write a "
            "KServe InferenceService example."
        ),
    )
    add_model(parser, "the exported .onnx file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="model repository folder")
    parser.add_argument(
        "--name",
        default=None,
        help="model name, one folder inside OUT_DIR: letters, digits and '_.-' only, "
        "not '.' or '..' (default: the file stem)",
    )
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=D.max_batch,
        help=f"max_batch_size; 0: no batching (default {D.max_batch}, as bnexport serve)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=D.instances,
        help=f"model instances (default {D.instances})",
    )
    parser.add_argument(
        "--instance-kind", choices=("auto", "gpu", "cpu"), default="auto", help="default auto"
    )
    parser.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=D.batch_timeout_ms,
        help=f"dynamic_batching max queue delay in ms (default {D.batch_timeout_ms:g}, "
        "as bnexport serve)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32", help="TensorRT plan precision"
    )
    parser.add_argument(
        "--kserve",
        metavar="STORAGE_URI",
        default=None,
        help="also write KServe manifests for OUT_DIR uploaded to this storage URI (s3://...): "
        "OUT_DIR/kserve-inferenceservice.yaml (Triton) and, for --backend onnxruntime, "
        "OUT_DIR/kserve-bnexport.yaml (the bnexport ClusterServingRuntime + an "
        "InferenceService on it); a GPU is requested only for TensorRT or --instance-kind gpu",
    )
    parser.add_argument(
        "--kserve-name",
        default=None,
        help="InferenceService name, a DNS-1035 label (default: the model name lower-cased, "
        "'_' and '.' as '-')",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the repository; print what was written and what is left to do."""
    from pathlib import Path

    from bnexport.atomic_write import check_output_paths
    from bnexport.serve.triton.repo import write_triton_repo

    model_dir = Path(args.out_dir) / (args.name or Path(args.model).stem)
    if args.kserve:  # a name KServe would refuse fails before anything is written
        from bnexport.serve.kserve import resolve_name

        resolve_name(args.kserve_name, model_dir.name)
    check_output_paths({"OUT_DIR/<model>": model_dir}, {"MODEL": args.model})
    result = write_triton_repo(
        args.model,
        args.out_dir,
        model_name=args.name,
        backend=args.backend,
        max_batch=args.max_batch,
        instances=args.instances,
        instance_kind=args.instance_kind,
        batch_timeout_ms=args.batch_timeout_ms,
        precision=args.precision,
    )
    print(f"wrote {result.config_path} (validated with Triton's model_config.proto)")
    if result.plan_written:
        print(f"wrote {result.model_file}")
    if args.kserve:
        from bnexport.serve.kserve import write_manifests

        paths, kserve_notes = write_manifests(
            args.out_dir,
            args.kserve,
            model_name=result.model_dir.name,
            backend=args.backend,
            instance_kind=args.instance_kind,
            max_batch=args.max_batch,
            batch_timeout_ms=args.batch_timeout_ms,
            name=args.kserve_name,
        )
        for path in paths:
            print(f"wrote {path}")
        result.notes.extend(kserve_notes)
    for note in result.notes:
        print(f"note: {note}")
    return 0
