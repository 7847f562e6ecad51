"""Write a Triton Inference Server model repository for an exported ONNX model.

Layout written (``--backend onnxruntime``)::

    OUT_DIR/<model>/config.pbtxt
    OUT_DIR/<model>/1/model.onnx

and for ``--backend tensorrt``::

    OUT_DIR/<model>/config.pbtxt
    OUT_DIR/<model>/1/model.plan      # built here: TensorRT must be installed (see below)
    OUT_DIR/<model>/model.onnx        # the source, outside the version folder
    OUT_DIR/<model>/README.md         # how to rebuild the plan and load the plugin

``config.pbtxt`` lists every input and output with its ``data_type`` and
``dims``. With ``max_batch_size > 0`` (the default is ``bnexport serve``'s
``--max-batch``) the first dimension of every tensor must be dynamic in the ONNX
graph; it is left out of ``dims``, as Triton expects, and the remaining dynamic
dimensions are written as ``-1``.
``dynamic_batching`` (queue delay from ``--batch-timeout-ms``) and an
``instance_group`` (``--instances`` copies, ``KIND_AUTO`` / ``KIND_GPU`` /
``KIND_CPU``) follow. The file is a ``ModelConfig`` message of Triton's own
model-config protobuf (shipped by tritonclient), printed by ``text_format`` and
parsed back to the identical message (:mod:`bnexport.serve.triton.config`).

TensorRT and the FusedNorm plugin
---------------------------------
A TensorRT plan is specific to the TensorRT version and GPU it was built on, so
it must be built with the TensorRT of the Triton release that serves it (for
example inside the ``tritonserver`` container). This module builds ``model.plan``
through :class:`bnexport.runtime.trt_backend.TrtBackend` (optimization profile batch
``1..max_batch_size``, the FusedNorm plugin registered for graphs that have
``bnexport::FusedNorm`` nodes, as :class:`bnexport.Session` does). Without
``tensorrt`` the request is refused before anything is written
(:class:`~bnexport.errors.MissingExtraError`, the CLI's exit 2): a repository whose
config names a plan that is not there would fail only when Triton loads it.

A graph that contains ``bnexport::FusedNorm`` needs the plugin at build *and*
at run time:

- the plugin is a Python (``tensorrt.plugin``) plugin. Its ahead-of-time
  implementation (``aot_impl``) compiles the kernel when the engine is built and
  embeds it in the plan, so Triton's C++ TensorRT backend runs the plan without
  Python and without a plugin library. A plan built with the JIT ``impl`` only
  calls back into Python and cannot run in Triton's TensorRT backend.
- a plugin compiled into a shared library instead is loaded by Triton with
  ``--backend-config=tensorrt,plugins="/path/libplugin.so"`` or, with older
  releases, ``LD_PRELOAD=/path/libplugin.so tritonserver ...``.

With ``--backend onnxruntime``, Triton's onnxruntime backend cannot run a
Python custom op, so FusedNorm nodes are lowered to standard ONNX ops first
(``bnexport_plugins.fused_norm.lowering.lower_fused_norm``).

Not possible on a machine without TensorRT: building or loading the plan; the
tests check the layout, the config and the refusal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any

from bnexport_plugins.fused_norm.spec import has_fused_norm

from bnexport.atomic_write import atomic_path, write_bytes_atomic
from bnexport.errors import UsageError
from bnexport.serve.settings import ServeSettings
from bnexport.serve.triton.config import (
    TensorConfig,
    check_model_name,
    check_round_trip,
    model_config,
    model_config_pb2,
    parse_config,
    render_config,
    tensor_configs,
)

__all__ = [
    "BACKENDS",
    "INSTANCE_KINDS",
    "TensorConfig",
    "TritonRepoResult",
    "model_config",
    "model_config_pb2",
    "parse_config",
    "render_config",
    "validate_model_name",
    "write_triton_repo",
]

BACKENDS = ("onnxruntime", "tensorrt")
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
#: the server's defaults: a repository batches as ``bnexport serve`` does by default
_D = ServeSettings()


@dataclasses.dataclass
class TritonRepoResult:
    """What :func:`write_triton_repo` wrote.

    Attributes:
        model_dir: ``OUT_DIR/<model>``.
        config_path: the validated ``config.pbtxt``.
        model_file: ``model.onnx`` or ``model.plan`` in the version folder.
        plan_written: always ``True`` (a TensorRT plan that cannot be built is refused);
            kept for callers.
        config: the parsed ``ModelConfig`` message.
        notes: what the user still has to do.
    """

    model_dir: Path
    config_path: Path
    model_file: Path
    plan_written: bool
    config: Any
    notes: list[str]


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst, make_parents=True) as tmp:
        shutil.copyfile(src, tmp)


def _lowered_bytes(model: Any) -> bytes:
    """FusedNorm nodes lowered to standard ONNX ops, for Triton's onnxruntime backend.

    The lowering ships with bnexport (``bnexport_plugins``), so it is imported without a
    guard: an ImportError here is a broken installation and must surface as one.
    """
    from bnexport_plugins.fused_norm.lowering import lower_fused_norm

    return lower_fused_norm(model).SerializeToString()


def validate_model_name(name: str) -> str:
    """A model name that is one folder inside the repository, checked as ``serve`` checks it.

    Raises:
        UsageError: the name is empty, ``.``/``..``, or uses anything but letters, digits
            and ``_.-`` (so ``--name ../../x`` cannot write outside ``OUT_DIR``).
    """
    return check_model_name(name, Path("--name"))


def write_triton_repo(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    backend: str = "onnxruntime",
    max_batch: int = _D.max_batch,
    instances: int = _D.instances,
    instance_kind: str = "auto",
    batch_timeout_ms: float = _D.batch_timeout_ms,
    precision: str = "fp32",
) -> TritonRepoResult:
    """Write ``OUT_DIR/<model>/`` for Triton and validate its config.pbtxt.

    Args:
        model_path: the exported ``.onnx`` file.
        out_dir: the model repository folder (created; other models in it are kept).
        model_name: name in Triton (default: the file stem).
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        max_batch: ``max_batch_size`` (0: no batch dimension, no dynamic batching).
        instances: model instances (``instance_group.count``).
        instance_kind: ``"auto"``, ``"gpu"`` or ``"cpu"`` (tensorrt: auto or gpu).
        batch_timeout_ms: ``dynamic_batching.max_queue_delay_microseconds`` / 1000.
        precision: ``"fp32"`` or ``"fp16"`` (TensorRT plan only).

    Returns:
        A :class:`TritonRepoResult`.

    Raises:
        UsageError: bad argument, unbatchable model with ``max_batch > 0``, an op
            the chosen backend cannot run.
        MissingExtraError: ``backend="tensorrt"`` without the ``tensorrt`` package
            (checked before anything is written).
    """
    import onnx

    src = Path(model_path)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model not found: {src}")
    bad = []
    if backend not in BACKENDS:
        bad.append(f"backend={backend!r} (one of {BACKENDS})")
    if max_batch < 0:
        bad.append(f"max_batch={max_batch} (>= 0)")
    if instances < 1:
        bad.append(f"instances={instances} (>= 1)")
    if instance_kind not in INSTANCE_KINDS or (backend == "tensorrt" and instance_kind == "cpu"):
        bad.append(
            f"instance_kind={instance_kind!r} (auto, gpu{', cpu' * (backend != 'tensorrt')})"
        )
    if bad:
        raise UsageError("triton-repo: invalid argument(s). Received: " + ", ".join(bad))
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        from bnexport.errors import MissingExtraError
        from bnexport.extras import install_hint

        raise MissingExtraError(
            "triton-repo --backend tensorrt builds 1/model.plan with TensorRT, which is not "
            f"installed ({install_hint('tensorrt')}); run it where Triton runs (same TensorRT "
            "and GPU), or use --backend onnxruntime",
            name="tensorrt",
        )
    if model_name is None:
        model_name = re.sub(r"[^A-Za-z0-9_.\-]", "_", src.stem)
    name = validate_model_name(model_name)
    from bnexport.io.onnx_file import load_onnx

    model = load_onnx(src, load_external_data=False)  # ModelFileError names the file
    check_known_ops(model, src)
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        raise UsageError(f"{src} keeps weights in external data files; save it as one file first")
    initializers = {init.name for init in model.graph.initializer}
    batched = max_batch > 0
    inputs = tensor_configs(model.graph.input, initializers, batched)
    outputs = tensor_configs(model.graph.output, set(), batched)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cfg = model_config(
        name,
        backend,
        inputs,
        outputs,
        max_batch=max_batch,
        instances=instances,
        instance_kind=INSTANCE_KINDS[instance_kind],
        queue_delay_us=int(round(batch_timeout_ms * 1000)),
    )
    text = render_config(cfg, source=f"{src.name} (sha256 {digest}...)")
    cfg = check_round_trip(text, cfg)

    model_dir = Path(out_dir) / name
    version_dir = model_dir / "1"
    notes: list[str] = []
    plan_written = True
    if backend == "onnxruntime":
        model_file = version_dir / "model.onnx"
        if has_fused_norm(model):
            write_bytes_atomic(model_file, _lowered_bytes(model), make_parents=True)
            notes.append("FusedNorm nodes were lowered to standard ONNX ops")
        else:
            _atomic_copy(src, model_file)
    else:
        model_file = version_dir / "model.plan"
        _atomic_copy(src, model_dir / "model.onnx")
        readme = _tensorrt_readme(name, src.name, max_batch, precision)
        write_bytes_atomic(model_dir / "README.md", readme.encode(), make_parents=True)
        plan = _build_plan(model, max_batch, precision)
        write_bytes_atomic(model_file, plan, make_parents=True)
    config_path = model_dir / "config.pbtxt"
    write_bytes_atomic(config_path, text.encode("utf-8"), make_parents=True)
    return TritonRepoResult(model_dir, config_path, model_file, plan_written, cfg, notes)


#: domains whose ops onnx's schema registry lists (onnxruntime implements them)
_SCHEMA_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
#: onnxruntime's contrib-op domain: implemented by onnxruntime, not listed by onnx
_ORT_CONTRIB_DOMAIN = "com.microsoft"


def check_known_ops(model: Any, source: str | os.PathLike) -> None:
    """Refuse a graph with an op neither Triton backend can run, naming the op.

    Known: ONNX ops (default and ``ai.onnx.ml`` domains, checked against onnx's schema
    registry at the model's opset), onnxruntime's ``com.microsoft`` contrib ops,
    bnexport's ``FusedNorm`` (lowered or built into the plan here), and functions the
    model defines itself. Anything else would make Triton fail to load the model when
    the server starts, far from this command: refusing here, with the op's name, is the
    earlier and clearer failure (a warning would still write a repository that cannot
    load).

    Raises:
        UsageError: one line naming the first unknown op, its domain and node, and how
            many more there are.
    """
    import onnx
    from bnexport_plugins.fused_norm.spec import is_fused_norm

    opsets = {o.domain or "": o.version for o in model.opset_import}
    functions = {(f.domain, f.name) for f in model.functions}
    unknown: dict[tuple[str, str], str] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        key = (domain, node.op_type)
        if key in unknown or key in functions or domain == _ORT_CONTRIB_DOMAIN:
            continue
        if is_fused_norm(node):
            continue
        if domain in _SCHEMA_DOMAINS:
            version = opsets.get(domain, opsets.get("", 1))
            try:
                onnx.defs.get_schema(node.op_type, version, "" if domain == "ai.onnx" else domain)
                continue
            except onnx.defs.SchemaError:
                pass
        unknown[key] = node.name or "<unnamed>"
    if unknown:
        (domain, op), node = next(iter(unknown.items()))
        more = f" (and {len(unknown) - 1} more unknown op(s))" if len(unknown) > 1 else ""
        raise UsageError(
            f"{os.fspath(source)}: op {op!r} (domain {domain or 'ai.onnx'!r}, node {node!r}) "
            f"is not an ONNX op, an onnxruntime contrib op or bnexport's FusedNorm; no Triton "
            f"backend could load this model{more}"
        )


def _build_plan(model: Any, max_batch: int, precision: str) -> bytes:
    """Serialized TensorRT engine with a batch profile ``1..max_batch``.

    The FusedNorm plugin is registered when the graph has FusedNorm nodes (without it
    TensorRT's parser reports "plugin not found").
    """
    from bnexport.runtime.io_check import tensor_infos_from_onnx
    from bnexport.runtime.trt_backend import TrtBackend

    initializers = {init.name for init in model.graph.initializer}
    ins = tensor_infos_from_onnx([v for v in model.graph.input if v.name not in initializers])
    outs = tensor_infos_from_onnx(model.graph.output)
    backend = TrtBackend(
        model.SerializeToString(),
        ins,
        outs,
        precision=precision,
        max_batch=max(1, max_batch),
        needs_fused_norm=has_fused_norm(model),
    )
    try:
        return bytes(backend.engine.serialize())
    finally:
        backend.close()


def _tensorrt_readme(name: str, source: str, max_batch: int, precision: str) -> str:
    fp16 = " --precision fp16" if precision == "fp16" else ""
    return f"""# {name}: TensorRT model for Triton

Source: `{source}`, copied to `{name}/model.onnx`.

`config.pbtxt` expects `1/model.plan`, a TensorRT engine. A plan only runs on the
TensorRT version and GPU it was built with, so build it with the TensorRT of the
Triton release that serves it, e.g. inside the `nvcr.io/nvidia/tritonserver:<xx.yy>-py3`
container with bnexport installed (`pip install bnexport[tensorrt]`):

    bnexport triton-repo {name}/model.onnx <this repository> --backend tensorrt \\
        --max-batch {max_batch}{fp16}

which registers the FusedNorm plugin, builds an engine whose optimization profile covers
batch 1..{max_batch} and writes `1/model.plan`.

## The FusedNorm plugin

- Graphs without `bnexport::FusedNorm` need nothing else (`trtexec --onnx=model.onnx
  --saveEngine=1/model.plan --minShapes=... --maxShapes=...` works as well).
- The bnexport plugin is a Python `tensorrt.plugin` plugin. Build with its ahead-of-time
  implementation (`aot_impl`): the compiled kernel is embedded in the plan and Triton's
  C++ TensorRT backend runs it without Python or a plugin library. A plan that uses the
  JIT `impl` calls back into Python and does not load in Triton's TensorRT backend.
- A plugin compiled into a shared library is loaded by Triton with
  `tritonserver --backend-config=tensorrt,plugins="/path/libplugin.so" ...`
  (several: `;`-separated) or `LD_PRELOAD=/path/libplugin.so tritonserver ...`.
"""
