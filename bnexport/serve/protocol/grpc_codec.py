"""Conversion between KServe v2 gRPC messages (``ModelInferRequest/Response``) and NumPy.

The messages are the generated classes shipped with ``tritonclient[grpc]``
(``tritonclient.grpc.service_pb2``); nothing here encodes protobuf by hand.

Inputs come in one of two forms, never mixed within a request (as in Triton):

- typed ``contents``: one repeated field per datatype family::

      BOOL -> bool_contents            INT8/16/32 -> int_contents   INT64 -> int64_contents
      UINT8/16/32 -> uint_contents     UINT64 -> uint64_contents
      FP32 -> fp32_contents            FP64 -> fp64_contents        BYTES -> bytes_contents

  (``FP16`` has no typed field: raw only). Values that do not fit the datatype
  (an ``int_contents`` value of 300 for ``INT8``) are refused, not wrapped.
- ``raw_input_contents``: one entry per input, in input order, little-endian
  row-major bytes (``BYTES``: each element a 4-byte little-endian length, then
  its bytes), exactly ``prod(shape) * itemsize`` long.

Outputs always go back as ``raw_output_contents`` (what Triton does, and what
``tritonclient.grpc``'s ``InferResult.as_numpy`` reads first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.serve.protocol import binary
from bnexport.serve.protocol.codec import DecodedRequest, datatype_of, numpy_dtype
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.protocol.tensor_limits import check_shape
from bnexport.serve.protocol.types import RequestOutput

#: KServe datatype -> the ``InferTensorContents`` field holding its values
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
#: typed contents with more elements than this are converted in a worker thread
OFFLOAD_ELEMENTS = 64 << 10


def _param_value(p: Any) -> Any:
    """The Python value of one ``InferParameter`` (its set oneof field)."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """``map<string, InferParameter>`` -> ``{name: value}``."""
    return {k: _param_value(v) for k, v in params.items()}


def typed_elements(request: Any) -> int:
    """Elements sent as typed ``contents`` (to decide whether decoding leaves the loop)."""
    if request.raw_input_contents:
        return 0
    return sum(math.prod(t.shape) for t in request.inputs)


def decode_request(request: Any) -> DecodedRequest:
    """``ModelInferRequest`` -> arrays of their datatype and shape.

    Raises:
        BadRequestError: unknown datatype, a shape outside the limits of
            :mod:`bnexport.serve.protocol.tensor_limits`, a count or byte
            size that does not match the shape, values out of range, mixed typed
            and raw contents, an input given twice.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in input order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise BadRequestError(f"input '{name}' appears twice in the request")
        dtype = numpy_dtype(tensor.datatype, name)
        shape = list(tensor.shape)
        count = check_shape(name, shape, dtype)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequestError(
                    f"input '{name}': has typed contents and raw_input_contents; use one"
                )
            arr = _from_raw(name, raw[i], dtype, tensor.datatype, shape, count)
        else:
            arr = _from_contents(name, tensor, dtype, count)
        inputs[name] = arr.reshape(shape)
    requested = [
        RequestOutput(name=o.name, parameters=parameters(o.parameters) or None)
        for o in request.outputs
    ]
    return DecodedRequest(
        id=request.id or None,
        inputs=inputs,
        outputs=requested or None,
        binary_output=True,
    )


def _from_raw(
    name: str, chunk: bytes, dtype: np.dtype, datatype: str, shape: list[int], count: int
) -> np.ndarray:
    if dtype == np.object_:
        try:
            arr = binary.deserialize_bytes(memoryview(chunk), name)
        except binary.BinaryFormatError as exc:
            raise BadRequestError(str(exc)) from None
    else:
        if len(chunk) != count * dtype.itemsize:
            raise BadRequestError(
                f"input '{name}': {len(chunk)} raw bytes, but shape {shape} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )
        arr = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    if arr.size != count:
        raise BadRequestError(
            f"input '{name}': {arr.size} elements given, shape {shape} needs {count}"
        )
    return arr


def _from_contents(name: str, tensor: Any, dtype: np.dtype, count: int) -> np.ndarray:
    datatype = tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequestError(
            f"input '{name}': {datatype} has no typed contents field; send it in raw_input_contents"
        )
    contents = tensor.contents
    used = [f.name for f, _ in contents.ListFields()] if tensor.HasField("contents") else []
    if any(f != field for f in used):
        raise BadRequestError(
            f"input '{name}': {datatype} values belong in contents.{field}, got {used}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequestError(
            f"input '{name}': {len(values)} elements given, "
            f"shape {list(tensor.shape)} needs {count}"
        )
    if dtype == np.object_:
        out = np.empty(count, dtype=np.object_)
        out[:] = list(values)
        return out
    if dtype.kind in "iu" and dtype.itemsize < 8 and count:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise BadRequestError(f"input '{name}': a value does not fit {datatype}")
        return wide.astype(dtype)
    return np.asarray(values, dtype=dtype)


def encode_response(
    response_cls: type,
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: Mapping[str, np.ndarray],
    requested: Sequence[RequestOutput] | None,
) -> Any:
    """Build a ``ModelInferResponse`` whose outputs are all in ``raw_output_contents``.

    Args:
        response_cls: ``service_pb2.ModelInferResponse``.
        model_name: model that answered.
        model_version: its version.
        request_id: the request's ``id`` (echoed when given).
        results: every output of the model, name -> array.
        requested: outputs the client named (in that order), or ``None`` for all.
    """
    names = list(results) if requested is None else [o.name for o in requested]
    response = response_cls(model_name=model_name, model_version=model_version, id=request_id or "")
    for name in names:
        arr = results[name]
        out = response.outputs.add()
        out.name = name
        out.datatype = datatype_of(arr.dtype)
        out.shape.extend(arr.shape)
        response.raw_output_contents.append(binary.tensor_bytes(arr))
    return response
