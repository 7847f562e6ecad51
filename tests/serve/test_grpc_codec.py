"""``ModelInferRequest`` <-> NumPy: every typed contents field, raw bytes, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from bnexport.serve.protocol import grpc_codec
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.protocol.types import RequestOutput

CASES = [
    ("BOOL", np.array([[True, False, True]])),
    ("INT8", np.array([[-128, 0, 127]], np.int8)),
    ("INT16", np.array([[-32768, 5, 32767]], np.int16)),
    ("INT32", np.array([[-(2**31), 7, 2**31 - 1]], np.int32)),
    ("INT64", np.array([[-(2**63), 9, 2**63 - 1]], np.int64)),
    ("UINT8", np.array([[0, 1, 255]], np.uint8)),
    ("UINT16", np.array([[0, 1, 65535]], np.uint16)),
    ("UINT32", np.array([[0, 1, 2**32 - 1]], np.uint32)),
    ("UINT64", np.array([[0, 1, 2**64 - 1]], np.uint64)),
    ("FP32", np.array([[-1.5, 0.0, 3.25]], np.float32)),
    ("FP64", np.array([[-1e300, 0.0, 1e-300]], np.float64)),
    ("BYTES", np.array([[b"a", b"", "h\u00e9".encode()]], dtype=object)),
]


def _request(datatype: str, x: np.ndarray, raw: bool) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m", id="r1")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
    if raw:
        if datatype == "BYTES":
            request.raw_input_contents.append(serialize_byte_tensor(x).item())
        else:
            request.raw_input_contents.append(x.astype(x.dtype.newbyteorder("<")).tobytes())
    else:
        field = getattr(tensor.contents, grpc_codec.CONTENTS_FIELD[datatype])
        field.extend(x.reshape(-1).tolist())
    return request


@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
@pytest.mark.parametrize(("datatype", "x"), CASES, ids=[c[0] for c in CASES])
def test_decode_every_datatype(datatype, x, raw):
    decoded = grpc_codec.decode_request(_request(datatype, x, raw))
    got = decoded.inputs["x"]
    assert got.shape == x.shape and decoded.id == "r1" and decoded.outputs is None
    if datatype == "BYTES":
        assert got.dtype == object and got.tolist() == x.tolist()
    else:
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)


def test_fp16_is_raw_only():
    x = np.array([[1.5, -2.0]], np.float16)
    got = grpc_codec.decode_request(_request("FP16", x, raw=True)).inputs["x"]
    np.testing.assert_array_equal(got, x)
    request = service_pb2.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(BadRequestError, match="raw_input_contents"):
        grpc_codec.decode_request(request)


@pytest.mark.parametrize(
    ("datatype", "values", "words"),
    [
        ("INT8", [300], "does not fit INT8"),
        ("UINT8", [256], "does not fit UINT8"),
        ("INT16", [1 << 20], "does not fit INT16"),
    ],
)
def test_typed_values_out_of_range_are_refused(datatype, values, words):
    request = service_pb2.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[len(values)])
    field = getattr(tensor.contents, grpc_codec.CONTENTS_FIELD[datatype])
    field.extend(values)
    with pytest.raises(BadRequestError, match=words):
        grpc_codec.decode_request(request)


def test_count_shape_and_duplicates_are_refused():
    request = _request("FP32", np.zeros((2, 3), np.float32), raw=False)
    request.inputs[0].shape[:] = [2, 4]
    with pytest.raises(BadRequestError, match="6 elements given, shape \\[2, 4\\] needs 8"):
        grpc_codec.decode_request(request)
    request.inputs[0].shape[:] = [-1, 3]
    with pytest.raises(BadRequestError, match="negative dimension"):
        grpc_codec.decode_request(request)
    request = _request("FP32", np.zeros((1, 2), np.float32), raw=True)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(BadRequestError, match="appears twice"):
        grpc_codec.decode_request(request)
    request.raw_input_contents.append(b"")
    with pytest.raises(BadRequestError, match="3 entries for 2 inputs"):
        grpc_codec.decode_request(request)
    request = _request("BYTES", np.array([b"abc"], dtype=object), raw=True)
    request.raw_input_contents[0] = b"\x09\0\0\0abc"
    with pytest.raises(BadRequestError, match="overruns"):
        grpc_codec.decode_request(request)


@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([1] * 40, "40 dimensions; at most 32"),  # NumPy would build it (its limit is 64)
        ([1] * 70, "70 dimensions; at most 32"),  # NumPy would raise ValueError
        ([2**40, 2**40, 0], "describes more than"),  # empty, yet too big for NumPy
        ([2**40], None),  # a dimension no data can fill: a count mismatch, no allocation
    ],
    ids=["rank40", "rank70", "empty-too-big", "dim2**40"],
)
def test_shape_limits_as_over_http(shape, words, raw):
    """The shape check of :mod:`bnexport.serve.protocol.tensor_limits`: the JSON codec's text."""
    from bnexport.serve.protocol import codec

    request = _request("FP32", np.zeros(1 if 0 not in shape else 0, np.float32), raw=raw)
    request.inputs[0].shape[:] = shape
    with pytest.raises(BadRequestError) as grpc_error:
        grpc_codec.decode_request(request)
    message = str(grpc_error.value)
    assert message.startswith("input 'x': "), message
    if words is None:
        assert "needs" in message
        return
    assert words in message
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":%s,"data":[]}]}' % str(shape).encode()
    with pytest.raises(BadRequestError) as http_error:
        codec.decode_request(body, None)
    assert str(http_error.value) == message


def test_largest_rank_is_accepted():
    request = _request("FP32", np.zeros(1, np.float32), raw=True)
    request.inputs[0].shape[:] = [1] * 32
    assert grpc_codec.decode_request(request).inputs["x"].shape == (1,) * 32


def test_encode_response_is_raw_and_in_requested_order():
    results = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": np.array([b"x", b"yz"], dtype=object),
    }
    requested = [RequestOutput(name="s"), RequestOutput(name="a")]
    response = grpc_codec.encode_response(
        service_pb2.ModelInferResponse, "m", "2", "id-9", results, requested
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "2", "id-9")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("s", "BYTES", [2]),
        ("a", "FP32", [2, 3]),
    ]
    assert response.raw_output_contents[0] == b"\x01\0\0\0x\x02\0\0\0yz"
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 3), results["a"]
    )
