"""Triton ``config.pbtxt``: the ``inference.ModelConfig`` message, built and printed by protobuf.

The message classes are Triton's own (``model_config_pb2`` from the tritonclient wheel);
:func:`model_config` fills a ``ModelConfig`` from an ONNX graph's inputs and outputs,
:func:`render_config` prints it with ``google.protobuf.text_format`` (strings escaped, so
any tensor name stays one field; never hand-assembled text), and :func:`check_round_trip`
parses the text back and requires the identical message. :func:`parse_config` is also
how ``bnexport serve`` reads a repository's ``config.pbtxt``.

Tensors: with ``max_batch_size > 0`` the first dimension of every input and output must
be dynamic in the ONNX graph and is left out of ``dims``; other dynamic dimensions are
``-1``; a tensor with no dimension besides the batch is ``dims: [1]`` with
``reshape { shape: [] }``.

The server answers a model-config request (HTTP ``GET .../config``, gRPC ``ModelConfig``)
from the same message: :func:`model_config` builds it once for a served model (with its
``platform`` and no instance group), gRPC sends it as it is, and :func:`config_json` gives
the HTTP body as Triton writes it (proto field names, every field printed, 64-bit
integers as JSON numbers).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Any

from bnexport.errors import UsageError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_model_name(name: str, where: Path) -> str:
    """``name`` if it can be one folder of a model repository, as Triton and ``serve`` read it.

    Raises:
        UsageError: the name is empty, ``.``/``..``, or uses anything but letters, digits
            and ``_.-`` (``where`` says which folder or flag it came from).
    """
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(
            f"model name {name!r} ({where}) may only use letters, digits, '_.-' "
            "and may not be '.' or '..'"
        )
    return name


#: onnx.TensorProto element type name -> Triton data_type
_ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}


_PB2_NAME = "tritonclient.grpc.model_config_pb2"


def model_config_pb2() -> Any:
    """Triton's ``model_config_pb2`` module, as shipped in the tritonclient wheel.

    The module needs only ``protobuf``, but importing it through its package runs
    ``tritonclient/grpc/__init__.py``, which raises ``RuntimeError`` without ``grpcio``
    (the ``tritonclient[grpc]`` extra). So the file is loaded directly, under its own
    name, unless it is already imported (then that module is returned: one set of
    message classes, one descriptor registration).

    Raises:
        UsageError: tritonclient or protobuf is not installed.
    """
    import sys

    if _PB2_NAME in sys.modules:
        return sys.modules[_PB2_NAME]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "validating config.pbtxt needs tritonclient: pip install 'tritonclient[http]>=2.40'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    file_spec = importlib.util.spec_from_file_location(_PB2_NAME, path)
    if file_spec is None or file_spec.loader is None or not path.is_file():
        raise UsageError(f"tritonclient has no model_config_pb2.py at {path}")
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError as exc:
        raise UsageError(f"model_config_pb2 needs protobuf: pip install protobuf ({exc})") from None
    sys.modules[_PB2_NAME] = module
    return module


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text into a ``inference.ModelConfig`` message.

    Raises:
        UsageError: the text is not a valid model config (names line and field).
    """
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise UsageError(f"invalid config.pbtxt: {exc}") from None


@dataclasses.dataclass(frozen=True)
class TensorConfig:
    """One ``input``/``output`` entry of config.pbtxt."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def tensor_configs(values: Any, initializers: set[str], batched: bool) -> list[TensorConfig]:
    """One :class:`TensorConfig` per ONNX value (initializers skipped), batch dim removed.

    Raises:
        UsageError: a type Triton has no ``data_type`` for, or a fixed first dimension
            when ``batched``.
    """
    import onnx

    out = []
    for vi in values:
        if vi.name in initializers:
            continue
        ttype = vi.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(ttype.elem_type)
        data_type = _ONNX_TO_TRITON.get(type_name)
        if data_type is None:
            raise UsageError(f"tensor '{vi.name}': ONNX type {type_name} has no Triton data_type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if batched:
            if not dims or dims[0] != -1:
                raise UsageError(
                    f"tensor '{vi.name}' has a fixed first dimension ({dims[:1]}); Triton's "
                    "batching needs a dynamic batch dimension. Re-export with a dynamic batch "
                    "or pass --max-batch 0"
                )
            dims = dims[1:]
        out.append(TensorConfig(vi.name, data_type, tuple(dims)))
    return out


def triton_data_type(datatype: str) -> str:
    """Triton's ``data_type`` of a KServe datatype (``FP32``: ``TYPE_FP32``, ``BYTES``: STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(
    name: str,
    backend: str,
    inputs: list[TensorConfig],
    outputs: list[TensorConfig],
    *,
    max_batch: int,
    instances: int = 0,
    instance_kind: str = "KIND_AUTO",
    queue_delay_us: int,
    platform: str = "",
) -> Any:
    """The ``inference.ModelConfig`` message of config.pbtxt (fields: see the module docstring).

    A tensor with no dims besides the batch (a scalar per batch item) is written as
    ``dims: [1]`` with ``reshape { shape: [] }``, as Triton expects.

    Args:
        name: the model's name.
        backend: Triton backend (``onnxruntime``, ``tensorrt``); ``""`` for none.
        inputs: the input tensors (batch dimension left out when ``max_batch > 0``).
        outputs: the output tensors (same rule).
        max_batch: ``max_batch_size``; 0: no batch dimension, no ``dynamic_batching``.
        instances: ``instance_group`` count; 0: no instance group (a served model's
            config, where ``--instances`` is the server's, not the model's).
        instance_kind: ``KIND_CPU``, ``KIND_GPU`` ...
        queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds``.
        platform: Triton platform (``onnxruntime_onnx``, ``tensorrt_plan``); ``""``: none.
    """
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig(name=name, backend=backend, platform=platform, max_batch_size=max_batch)
    for entries, tensors in ((cfg.input, inputs), (cfg.output, outputs)):
        for t in tensors:
            entry = entries.add(name=t.name, data_type=pb2.DataType.Value(t.data_type))
            entry.dims.extend(t.dims or (1,))
            if not t.dims:
                entry.reshape.SetInParent()  # reshape { } : shape [] per batch item
    if max_batch > 0:
        cfg.dynamic_batching.SetInParent()
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    if instances:
        kind = pb2.ModelInstanceGroup.Kind.Value(instance_kind)
        cfg.instance_group.add(count=instances, kind=kind)
    return cfg


def config_json(cfg: Any) -> dict[str, Any]:
    """A ``ModelConfig`` as Triton's HTTP ``GET /v2/models/{name}/config`` answers it.

    ``google.protobuf.json_format`` with the proto's field names and every field printed
    (defaults included, as Triton does); proto3's JSON mapping writes 64-bit integers
    (``dims``, ``max_queue_delay_microseconds``) as strings, Triton as numbers, which is
    what ``tritonclient.http``'s users index into (``config["input"][0]["dims"] ==
    [8, 8, 1]``): they are turned back into numbers here.
    """
    from google.protobuf import json_format

    try:
        body = json_format.MessageToDict(
            cfg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf < 5.26 names the option differently
        body = json_format.MessageToDict(
            cfg, preserving_proto_field_name=True, including_default_value_fields=True
        )
    return _int64_as_numbers(cfg.DESCRIPTOR, body)


def _int64_as_numbers(descriptor: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Turn the 64-bit integer fields of ``body`` (a message of ``descriptor``) into ints."""
    from google.protobuf.descriptor import FieldDescriptor

    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for field in descriptor.fields:
        if field.name not in body:
            continue
        value = body[field.name]
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            inner = message.fields_by_name["value"]
            for key, item in value.items():
                if inner.message_type is not None:
                    _int64_as_numbers(inner.message_type, item)
                elif inner.cpp_type in wide:
                    value[key] = int(item)
        elif message is not None:
            for item in value if isinstance(value, list) else [value]:
                _int64_as_numbers(message, item)
        elif field.cpp_type in wide:
            body[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return body


def render_config(cfg: Any, *, source: str) -> str:
    """config.pbtxt text: a comment naming ``source``, then ``cfg`` printed by ``text_format``.

    ``text_format`` escapes every string (a tensor name with quotes or newlines stays one
    field), which is why the text is never assembled by hand.
    """
    from google.protobuf import text_format

    comment = " ".join(f"Written by `bnexport triton-repo` from {source}.".split())
    return f"# {comment}\n" + text_format.MessageToString(cfg)


def check_round_trip(text: str, cfg: Any) -> Any:
    """Parse ``text`` with Triton's model-config protobuf; it must give back ``cfg`` exactly."""
    parsed = parse_config(text)
    if parsed != cfg:
        raise UsageError(
            f"config.pbtxt does not parse back to the config that was meant: {parsed!r} != {cfg!r}"
        )
    return parsed
