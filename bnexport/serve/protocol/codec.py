"""Conversion between KServe v2 tensors (JSON or binary) and NumPy arrays.

Datatypes map one-to-one onto NumPy dtypes (``FP32`` <-> ``float32``, ...);
``BYTES`` maps to object arrays of ``bytes``. ``BF16`` has no NumPy dtype and is
refused. JSON ``data`` may be flat or nested, in row-major order; its element
count must equal the product of ``shape``. Values are converted without silent
loss: a float in an integer tensor, an out-of-range integer or a number in a
``BOOL`` tensor is a 400 naming the input. Parameters are type-checked:
``binary_data_output`` / ``binary_data`` must be JSON booleans (the string
``"false"`` is a 400, not a truthy value), ``binary_data_size`` an integer.

Non-finite floats: JSON has no NaN or infinity. Like Triton (which writes and
parses them with rapidjson's ``kWriteNanAndInfFlag`` / ``kParseNanAndInfFlag``
since server PR #3870), the server writes the bare tokens ``NaN``, ``Infinity``
and ``-Infinity`` in JSON ``data`` and accepts them in requests. ``tritonclient``,
Python's ``json`` and JavaScript's ``JSON5`` read them; strict parsers (``jq``,
``JSON.parse``, Go's ``encoding/json``) do not: such clients should ask for
binary outputs (``binary_data_output: true``), which carry the exact IEEE values.

Large responses are serialized a slice of :data:`JSON_CHUNK` elements at a time,
so that a worker thread encoding them gives the GIL back to the event loop
between slices (one ``json.dumps`` of millions of floats would hold it for
seconds).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import ValidationError

from bnexport.serve.protocol import binary
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.protocol.tensor_limits import check_shape
from bnexport.serve.protocol.types import InferenceRequest, RequestOutput

#: KServe datatype -> NumPy dtype
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_NUMPY.items()}
#: elements serialized per ``json.dumps`` call in a JSON response
JSON_CHUNK = 16384
#: output parameters this server implements (Triton's ``classification`` is not one)
_OUTPUT_PARAMETERS = frozenset({"binary_data"})


def datatype_of(dtype: np.dtype) -> str:
    """KServe datatype of a NumPy dtype (``str``/``bytes`` arrays are ``BYTES``)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "SUO":
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[dtype.newbyteorder("=")]
    except KeyError:
        raise BadRequestError(f"dtype {dtype} has no KServe datatype") from None


def numpy_dtype(datatype: str, name: str) -> np.dtype:
    """NumPy dtype of a KServe datatype; 400 naming input ``name`` when unsupported."""
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except KeyError:
        raise BadRequestError(
            f"input '{name}': unsupported datatype {datatype!r}; "
            f"expected one of {sorted(DATATYPE_TO_NUMPY)}"
        ) from None


@dataclasses.dataclass
class DecodedRequest:
    """An inference request with its tensors as NumPy arrays.

    Attributes:
        id: request id to echo, or ``None``.
        inputs: input name -> array, in request order.
        outputs: outputs the client named, or ``None`` for all.
        binary_output: default for outputs without their own ``binary_data``.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestOutput] | None
    binary_output: bool


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"malformed inference request: {where}: {first['msg']}"


def decode_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Parse an infer body (plain JSON or JSON + binary tensors) into arrays.

    Raises:
        BadRequestError: malformed JSON, framing, datatype, shape or data.
    """
    try:
        json_bytes, tail = binary.split_body(body, header_length)
        try:
            req = InferenceRequest.model_validate_json(json_bytes)
        except ValidationError as exc:
            raise BadRequestError(_validation_message(exc)) from None
        reader = binary.BinaryReader(tail)
        inputs: dict[str, np.ndarray] = {}
        for inp in req.inputs:
            if inp.name in inputs:
                raise BadRequestError(f"input '{inp.name}' appears twice in the request")
            inputs[inp.name] = _decode_input(inp, reader)
        reader.check_consumed()
    except binary.BinaryFormatError as exc:
        raise BadRequestError(str(exc)) from None
    params = req.parameters or {}
    binary_output = _bool_parameter(params, "binary_data_output", "request")
    names = set()
    for out in req.outputs or []:
        where = f"output '{out.name}'"
        if out.name in names:
            raise BadRequestError(f"{where} is requested twice")
        names.add(out.name)
        out_params = out.parameters or {}
        _bool_parameter(out_params, "binary_data", where)
        unknown = sorted(set(out_params) - _OUTPUT_PARAMETERS)
        if unknown:
            raise BadRequestError(
                f"{where}: unsupported parameter(s) {unknown}; supported: binary_data"
            )
    return DecodedRequest(
        id=req.id,
        inputs=inputs,
        outputs=req.outputs,
        binary_output=binary_output,
    )


def _bool_parameter(params: Mapping, key: str, where: str, default: bool = False) -> bool:
    """``params[key]`` when it is a JSON boolean; 400 naming ``where`` when it is not."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequestError(
            f"{where}: parameter '{key}' must be a JSON boolean (true or false). "
            f"Received: {value!r} ({type(value).__name__})"
        )
    return value


def _decode_input(inp, reader: binary.BinaryReader) -> np.ndarray:
    """One ``$request_input`` -> array of its datatype and shape."""
    name = inp.name
    dtype = numpy_dtype(inp.datatype, name)
    count = check_shape(name, inp.shape, dtype)
    params = inp.parameters or {}
    size = params.get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise BadRequestError(f"input '{name}': has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int):
            raise BadRequestError(f"input '{name}': binary_data_size must be an integer")
        chunk = reader.take(name, size)
        if dtype == np.object_:
            arr = binary.deserialize_bytes(chunk, name)
        else:
            if size != count * dtype.itemsize:
                raise BadRequestError(
                    f"input '{name}': binary_data_size={size} bytes, but shape {inp.shape} "
                    f"of {inp.datatype} needs {count * dtype.itemsize}"
                )
            arr = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    elif inp.data is not None:
        arr = _from_json(name, inp.data, dtype, inp.datatype)
    else:
        raise BadRequestError(f"input '{name}': has neither 'data' nor binary_data_size")
    if arr.size != count:
        raise BadRequestError(
            f"input '{name}': {arr.size} elements given, shape {inp.shape} needs {count}"
        )
    return arr.reshape(inp.shape)


def _from_json(name: str, data: list, dtype: np.dtype, datatype: str) -> np.ndarray:
    """JSON ``$tensor_data`` -> flat array of ``dtype``, refusing lossy conversions."""
    if dtype == np.object_:
        flat = np.array(data, dtype=np.object_).reshape(-1)
        out = np.empty(flat.shape, dtype=np.object_)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise BadRequestError(f"input '{name}': BYTES elements must be strings in JSON")
            out[i] = item.encode("utf-8")
        return out
    try:
        raw = np.array(data)
    except ValueError:
        raise BadRequestError(f"input '{name}': 'data' is a ragged nested list") from None
    raw = raw.reshape(-1)
    if raw.size == 0:
        return raw.astype(dtype)
    kind = raw.dtype.kind
    if dtype.kind in "iu" and kind in "fO":
        raw = _big_integers(
            raw, data, f"input '{name}'"
        )  # e.g. UINT64 [0, 2**63]: NumPy guesses float64
        kind = raw.dtype.kind
    ok = {
        "b": kind == "b",
        "i": kind in "iu",
        "u": kind in "iu",
        "f": kind in "iuf",
    }[dtype.kind]
    if not ok:
        raise BadRequestError(
            f"input '{name}': {datatype} data must be "
            f"{'booleans' if dtype.kind == 'b' else 'numbers'}; got {raw.dtype.name} values"
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise BadRequestError(f"input '{name}': a value does not fit {datatype}")
    return raw.astype(dtype, copy=False)


def _big_integers(raw: np.ndarray, data: list, name: str) -> np.ndarray:
    """``data`` as exact integers when every element is a JSON integer, else ``raw`` unchanged.

    ``np.array`` turns a list mixing integers below and above 2**63 into float64
    (losing precision); the elements are checked one by one instead.
    """
    flat = np.array(data, dtype=np.object_).reshape(-1)
    if not all(type(v) is int for v in flat):  # bool, float, str, list: not integers
        return raw
    lo, hi = min(flat), max(flat)
    if lo >= 0 and hi < 2**64:
        return np.array(flat.tolist(), dtype=np.uint64)
    if -(2**63) <= lo and hi < 2**63:
        return np.array(flat.tolist(), dtype=np.int64)
    raise BadRequestError(f"{name}: a value does not fit 64-bit integers")


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: Mapping[str, np.ndarray],
    requested: Sequence[RequestOutput] | None,
    binary_output: bool,
) -> tuple[bytes, int | None]:
    """Build an inference response body.

    Args:
        model_name: model that answered.
        model_version: its version.
        request_id: the request's ``id`` (echoed when given).
        results: every output of the model, name -> array.
        requested: outputs the client named (in that order), or ``None`` for all.
        binary_output: default for outputs whose parameters do not say.

    Returns:
        ``(body, header_length)``; see :func:`bnexport.serve.protocol.binary.join_body`.
    """
    if requested is None:
        wanted = [(name, None) for name in results]
    else:
        wanted = [(o.name, o.parameters or {}) for o in requested]
    outputs: list[bytes] = []
    chunks: list[bytes] = []
    for name, params in wanted:
        arr = results[name]
        as_binary = binary_output if not params else bool(params.get("binary_data", binary_output))
        entry: dict = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if as_binary:
            raw = binary.tensor_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
            outputs.append(_dumps(entry))
        else:
            head = _dumps(entry)[:-1]  # '{...' without its closing brace
            outputs.append(b"".join([head, b',"data":[', _json_elements(name, arr), b"]}"]))
    header = [
        b'{"model_name":',
        _dumps(model_name),
        b',"model_version":',
        _dumps(model_version),
        b',"outputs":[',
        b",".join(outputs),
        b"]",
    ]
    if request_id is not None:
        header += [b',"id":', _dumps(request_id)]
    header.append(b"}")
    return binary.join_body(b"".join(header), chunks)


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _json_elements(name: str, arr: np.ndarray) -> bytes:
    """The elements of ``arr``, row-major, comma-separated JSON (no brackets).

    Written :data:`JSON_CHUNK` elements per ``json.dumps`` call. Floats are the
    shortest repr of the value as a double; NaN/Inf as ``NaN`` / ``Infinity`` /
    ``-Infinity`` (see the module docstring).
    """
    flat = arr.reshape(-1)
    if arr.dtype == np.object_ or arr.dtype.kind in "SU":
        try:
            items = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in flat]
        except UnicodeDecodeError:
            raise BadRequestError(
                f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot carry; "
                "request it as binary data (parameters.binary_data: true)"
            ) from None
        parts = [_dumps(items[i : i + JSON_CHUNK])[1:-1] for i in range(0, len(items), JSON_CHUNK)]
    else:
        parts = [
            _dumps(flat[i : i + JSON_CHUNK].tolist())[1:-1] for i in range(0, flat.size, JSON_CHUNK)
        ]
    return b",".join(parts)
