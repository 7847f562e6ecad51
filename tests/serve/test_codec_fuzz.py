"""Property-based tests (hypothesis) of the KServe v2 JSON and binary codec.

Properties:

- Round trip: any valid request (every datatype, ranks 0-3, empty tensors, NaN,
  infinities, -0.0, extreme integers, arbitrary BYTES; each input as flat JSON,
  nested JSON or binary data) decodes to exactly the arrays that were sent: same
  dtype, same shape, same bits (NaN compared as NaN in JSON, whose token carries
  no payload).
- Responses: ``encode_response`` parsed back with Python's ``json`` and the binary
  tail gives exactly the model's arrays.
- Robustness: random bytes, random JSON made of the protocol's own keys, and
  byte-level mutations of valid bodies either decode or raise ``BadRequestError``:
  never another exception (which the server would answer with 500).
- Over HTTP, the same junk never gets a 5xx, and every error is ``{"error": ...}``.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnexport.serve.protocol import binary, codec
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.protocol.types import RequestOutput

DATATYPES = sorted(codec.DATATYPE_TO_NUMPY)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies ---------------------------------------------------------------------------------
@st.composite
def tensors(draw, text_only: bool = False) -> tuple[str, np.ndarray]:
    """(datatype, array) with any value the datatype can hold."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        element = st.text(max_size=6).map(str.encode) if text_only else st.binary(max_size=6)
        items = draw(st.lists(element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return datatype, arr.reshape(shape)
    dtype = codec.DATATYPE_TO_NUMPY[datatype]
    return datatype, draw(hnp.arrays(dtype, shape))


def _json_data(arr: np.ndarray, nested: bool) -> list:
    nested = nested and arr.ndim > 0  # a rank-0 tensor's data is a list of one element
    if arr.dtype == object:
        flat = [x.decode("utf-8") for x in arr.reshape(-1)]
        return np.array(flat, dtype=object).reshape(arr.shape).tolist() if nested else flat
    if nested:
        return arr.tolist()
    return arr.reshape(-1).tolist()


@st.composite
def requests(draw) -> tuple[bytes, str | None, dict, dict]:
    """A valid infer body, its header length, the arrays sent and the request fields."""
    n = draw(st.integers(1, 3))
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=n, max_size=n, unique=True))
    modes = draw(st.lists(st.sampled_from(["flat", "nested", "binary"]), min_size=n, max_size=n))
    inputs, sent, chunks = [], {}, []
    for name, mode in zip(names, modes, strict=True):
        datatype, arr = draw(tensors(text_only=mode != "binary"))
        entry = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if mode == "binary":
            raw = binary.tensor_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(arr, nested=mode == "nested")
        inputs.append(entry)
        sent[name] = (arr, mode)
    fields: dict = {
        "id": draw(st.none() | st.text(max_size=10)),
        "binary_output": draw(st.booleans()),
        "outputs": draw(
            st.none()
            | st.lists(
                st.tuples(st.text(min_size=1, max_size=5), st.none() | st.booleans()),
                max_size=3,
                unique_by=lambda t: t[0],
            )
        ),
    }
    request: dict = {
        "inputs": inputs,
        "parameters": {"binary_data_output": fields["binary_output"]},
    }
    if fields["id"] is not None:
        request["id"] = fields["id"]
    if fields["outputs"] is not None:
        request["outputs"] = [
            {"name": o} if b is None else {"name": o, "parameters": {"binary_data": b}}
            for o, b in fields["outputs"]
        ]
    head = json.dumps(request).encode()  # NaN / Infinity tokens, as Triton writes them
    if not chunks:
        return head, None, sent, fields
    return head + b"".join(chunks), str(len(head)), sent, fields


def _assert_same(got: np.ndarray, want: np.ndarray, exact_bits: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == object:
        assert got.tolist() == want.tolist()
    elif exact_bits or want.dtype.kind not in "f":
        assert got.tobytes() == want.tobytes()
    else:  # JSON: NaN has no payload or sign; everything else bit-exact (-0.0 included)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert got[~nan].tobytes() == want[~nan].tobytes()


# -- properties of the codec --------------------------------------------------------------------
@FUZZ
@given(requests())
def test_valid_requests_decode_to_exactly_what_was_sent(case):
    body, header_length, sent, fields = case
    decoded = codec.decode_request(body, header_length)
    assert list(decoded.inputs) == list(sent)
    for name, (want, mode) in sent.items():
        _assert_same(decoded.inputs[name], want, exact_bits=mode == "binary")
    assert decoded.id == fields["id"] and decoded.binary_output == fields["binary_output"]
    if fields["outputs"] is None:
        assert decoded.outputs is None
    else:
        assert [o.name for o in decoded.outputs] == [o for o, _ in fields["outputs"]]


@FUZZ
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=6), tensors()), max_size=3, unique_by=lambda t: t[0]
    ),
    st.booleans(),
    st.none() | st.text(max_size=6),
)
def test_responses_parse_back_to_the_model_outputs(outputs, binary_output, request_id):
    results = {name: arr for name, (_, arr) in outputs}
    has_non_utf8 = any(
        arr.dtype == object and any(not _is_utf8(x) for x in arr.reshape(-1))
        for arr in results.values()
    )
    try:
        body, header_length = codec.encode_response(
            "m", "1", request_id, results, None, binary_output
        )
    except BadRequestError as exc:  # only: non-UTF-8 BYTES asked for as JSON
        assert has_non_utf8 and not binary_output and "binary_data" in str(exc)
        return
    head = body if header_length is None else body[:header_length]
    tail = b"" if header_length is None else body[header_length:]
    parsed = json.loads(head)
    assert parsed["model_name"] == "m" and parsed.get("id") == request_id
    offset = 0
    for out, (name, want) in zip(parsed["outputs"], results.items(), strict=True):
        assert out["name"] == name and out["shape"] == list(want.shape)
        assert out["datatype"] == codec.datatype_of(want.dtype)
        if "data" in out:
            got = codec._from_json(name, out["data"], want.dtype, out["datatype"])
            _assert_same(got.reshape(want.shape), want, exact_bits=False)
        else:
            size = out["parameters"]["binary_data_size"]
            chunk = tail[offset : offset + size]
            offset += size
            if want.dtype == object:
                got = binary.deserialize_bytes(chunk, name).reshape(want.shape)
            else:
                got = np.frombuffer(chunk, want.dtype.newbyteorder("<")).reshape(want.shape)
            _assert_same(got.astype(want.dtype), want, exact_bits=True)
    assert offset == len(tail)


def _is_utf8(x: bytes) -> bool:
    try:
        x.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode_or_400(body: bytes, header_length: str | None) -> None:
    try:
        codec.decode_request(body, header_length)
    except BadRequestError as exc:
        assert str(exc)  # a message, never empty


_KEYS = [
    "inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "id",
    "binary_data_size", "binary_data_output", "binary_data", "classification",
]  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from(DATATYPES + ["BF16", "FP8", ""])
    | st.text(max_size=5)
)
junk_json = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=25,
)


@FUZZ
@given(st.binary(max_size=200), st.none() | st.text(max_size=6) | st.integers(-5, 300).map(str))
def test_random_bytes_are_400_or_decode(body, header_length):
    _decode_or_400(body, header_length)


@FUZZ
@given(junk_json, st.binary(max_size=64), st.booleans())
def test_protocol_shaped_junk_is_400_or_decodes(doc, tail, with_tail):
    head = json.dumps(doc).encode()
    if with_tail:
        _decode_or_400(head + tail, str(len(head)))
    else:
        _decode_or_400(head, None)


@FUZZ
@given(requests(), st.data())
def test_mutated_valid_bodies_are_400_or_decode(case, data):
    body, header_length, _, _ = case
    body = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del body[at : at + data.draw(st.integers(1, 8))]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    _decode_or_400(bytes(body), header_length)


def test_requested_output_parameters_are_typed():
    """The fuzzed output parameters above are booleans; anything else is a 400."""
    ok = RequestOutput(name="y", parameters={"binary_data": True})
    assert ok.parameters == {"binary_data": True}
    body = {"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}
    with pytest.raises(BadRequestError, match="output 'y'.*binary_data.*boolean"):
        codec.decode_request(json.dumps(body).encode(), None)


# -- over HTTP: never a 5xx ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(junk_json.map(lambda d: json.dumps(d).encode()), st.binary(max_size=300)),
    st.none() | st.text(alphabet="0123456789-x ", max_size=4),
    st.sampled_from(["digits", "gather", "nope"]),
)
def test_http_junk_never_gets_5xx(server, body, header_length, model):
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    try:
        resp = httpx.post(f"http://{server}/v2/models/{model}/infer", content=body, headers=headers)
    except httpx.LocalProtocolError:  # httpx itself refuses the header value
        return
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert set(resp.json()) == {"error"}


@pytest.mark.parametrize(
    "data, datatype, want",
    [
        ([0, 2**63], "UINT64", np.array([0, 2**63], np.uint64)),  # NumPy alone: float64
        ([2**64 - 1, 1], "UINT64", np.array([2**64 - 1, 1], np.uint64)),
        ([-(2**63), 2**63 - 1], "INT64", np.array([-(2**63), 2**63 - 1], np.int64)),
    ],
)
def test_integers_beyond_int64_are_exact(data, datatype, want):
    """Found by the response round trip: JSON integers above 2**63 decode exactly."""
    body = {"inputs": [{"name": "a", "shape": [2], "datatype": datatype, "data": data}]}
    got = codec.decode_request(json.dumps(body).encode(), None).inputs["a"]
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("data", [[0, 2**64], [-1, 2**63], [1.0, 2**63]])
def test_integers_beyond_64_bits_are_400(data):
    body = {"inputs": [{"name": "a", "shape": [2], "datatype": "UINT64", "data": data}]}
    with pytest.raises(BadRequestError, match="input 'a'"):
        codec.decode_request(json.dumps(body).encode(), None)
