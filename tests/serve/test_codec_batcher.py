"""Codec (JSON/binary tensors) and dynamic batcher units, exact where the data is exact."""

from __future__ import annotations

import asyncio
import json
import struct
import threading

import numpy as np
import pytest
from support import async_wait_until

from bnexport.serve.core.batcher import DynamicBatcher
from bnexport.serve.protocol import binary, codec
from bnexport.serve.protocol.errors import BadRequestError, UnavailableError
from bnexport.serve.protocol.types import InferenceResponse, RequestOutput


def _binary_body(header: dict, *chunks: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), str(len(head))


def test_decode_json_nested_and_flat():
    body = json.dumps(
        {
            "id": "7",
            "inputs": [
                {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]},
                {"name": "b", "shape": [3], "datatype": "INT64", "data": [1, -2, 3]},
                {"name": "c", "shape": [2], "datatype": "BOOL", "data": [True, False]},
                {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hé"]},
            ],
        }
    ).encode()
    req = codec.decode_request(body, None)
    assert req.id == "7" and req.outputs is None and not req.binary_output
    np.testing.assert_array_equal(req.inputs["a"], np.array([[1, 2], [3, 4.5]], np.float32))
    assert req.inputs["a"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["b"], np.array([1, -2, 3], np.int64))
    np.testing.assert_array_equal(req.inputs["c"], [True, False])
    assert req.inputs["s"][0] == "hé".encode()


def test_decode_binary_inputs_in_order():
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    b = np.array([[7, 8]], dtype=np.uint8)
    words = np.array([b"x", b"yz"], dtype=object)
    header = {
        "inputs": [
            {
                "name": "a",
                "shape": [2, 3],
                "datatype": "FP16",
                "parameters": {"binary_data_size": a.nbytes},
            },
            {
                "name": "w",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 11},
            },
            {
                "name": "b",
                "shape": [1, 2],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": 2},
            },
        ],
        "parameters": {"binary_data_output": True},
    }
    body, hlen = _binary_body(header, a.tobytes(), binary.serialize_bytes(words), b.tobytes())
    req = codec.decode_request(body, hlen)
    assert req.binary_output
    np.testing.assert_array_equal(req.inputs["a"], a)
    np.testing.assert_array_equal(req.inputs["b"], b)
    assert list(req.inputs["w"]) == [b"x", b"yz"]


@pytest.mark.parametrize(
    "inp, fragment",
    [
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}, "1 elements given"),
        ({"name": "x", "shape": [1], "datatype": "BF16", "data": [1.0]}, "unsupported datatype"),
        ({"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}, "must be numbers"),
        ({"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}, "does not fit INT8"),
        ({"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}, "must be booleans"),
        ({"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}, "must be numbers"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": [[1.0], [2.0, 3.0]]}, "ragged"),
        ({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}, "negative"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "neither"),
    ],
)
def test_decode_json_errors(inp, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        codec.decode_request(json.dumps({"inputs": [inp]}).encode(), None)


@pytest.mark.parametrize(
    "body, hlen, fragment",
    [
        (b"{not json", None, "malformed inference request"),
        (b'{"inputs": 3}', None, "malformed inference request: inputs"),
        (b'{"inputs": []}', "99", "outside the body"),
        (b'{"inputs": []}', "x", "must be an integer"),
    ],
)
def test_decode_malformed(body, hlen, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        codec.decode_request(body, hlen)


def test_decode_binary_size_errors():
    def one(size, chunk, shape=(2,)):
        header = {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
        return codec.decode_request(*_binary_body(header, chunk))

    with pytest.raises(BadRequestError, match="overruns"):
        one(16, b"\0" * 8)
    with pytest.raises(BadRequestError, match="needs 8"):
        one(4, b"\0" * 4)
    with pytest.raises(BadRequestError, match="follow the last binary input"):
        one(8, b"\0" * 12)


def test_encode_response_json_and_binary():
    results = {
        "y": np.array([[1.5, -2.0]], np.float32),
        "k": np.array([3, 4], np.int64),
        "s": np.array([b"ab"], dtype=object),
    }
    requested = [
        RequestOutput(name="k"),
        RequestOutput(name="y", parameters={"binary_data": True}),
        RequestOutput(name="s", parameters={"binary_data": False}),
    ]
    body, hlen = codec.encode_response("m", "3", None, results, requested, False)
    header = json.loads(body[:hlen])
    InferenceResponse.model_validate(header)  # follows the protocol grammar
    assert "id" not in header and header["model_version"] == "3"
    k, y, s = header["outputs"]
    assert k == {"name": "k", "datatype": "INT64", "shape": [2], "data": [3, 4]}
    assert y["parameters"] == {"binary_data_size": 8} and "data" not in y
    assert s["data"] == ["ab"] and s["datatype"] == "BYTES"
    np.testing.assert_array_equal(np.frombuffer(body[hlen:], "<f4"), [1.5, -2.0])
    body, hlen = codec.encode_response("m", "3", "q", {"k": results["k"]}, None, False)
    assert hlen is None and json.loads(body)["id"] == "q"


def test_bytes_framing_roundtrip():
    arr = np.array([b"", b"abc", "é".encode()], dtype=object)
    raw = binary.serialize_bytes(arr)
    assert raw[:4] == struct.pack("<I", 0)
    assert list(binary.deserialize_bytes(raw, "x")) == list(arr)
    with pytest.raises(binary.BinaryFormatError, match="overruns"):
        binary.deserialize_bytes(raw[:-1], "x")


# -- batcher ----------------------------------------------------------------------------------


class _CountingModel:
    """y = x * w + 1 and sum = row sums (elementwise, so exact at any batch size); counts calls."""

    def __init__(self, fail_on: float | None = None):
        self.w = np.random.default_rng(0).standard_normal(4).astype(np.float32)
        self.calls: list[int] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, feed):
        x = feed["x"]
        with self.lock:
            self.calls.append(len(x))
        if self.fail_on is not None and np.any(x == self.fail_on):
            raise RuntimeError("poisoned row")
        return {"y": x * self.w.astype(x.dtype) + 1, "sum": x.sum(axis=1)}


def _run(coro):
    return asyncio.run(coro)


def test_batcher_merges_splits_and_matches_unbatched():
    model = _CountingModel()
    xs = [
        np.random.default_rng(i).standard_normal((1 + i % 3, 4)).astype(np.float32)
        for i in range(12)
    ]

    async def main():
        b = DynamicBatcher(model, max_batch=64, timeout_s=0.05)
        outs = await asyncio.gather(*(b.submit({"x": x}, len(x)) for x in xs))
        await b.close()
        return outs

    outs = _run(main())
    assert model.calls == [sum(len(x) for x in xs)]  # one run for all
    for x, out in zip(xs, outs, strict=True):
        want = model({"x": x})
        np.testing.assert_array_equal(out["y"], want["y"])
        np.testing.assert_array_equal(out["sum"], want["sum"])


def test_batcher_respects_max_batch_and_signature():
    model = _CountingModel()

    async def main():
        b = DynamicBatcher(model, max_batch=4, timeout_s=0.05)
        xs = [np.ones((1, 4), np.float32) * i for i in range(10)]
        odd = np.ones((2, 4), np.float64)  # other dtype: its own batch
        outs = await asyncio.gather(*(b.submit({"x": x}, 1) for x in xs), b.submit({"x": odd}, 2))
        await b.close()
        return outs

    outs = _run(main())
    assert max(model.calls) <= 4
    assert sum(model.calls) == 12
    assert outs[-1]["y"].dtype == np.float64
    assert [float(o["sum"][0]) for o in outs[:10]] == [4.0 * i for i in range(10)]


def test_batcher_max_batch_one_runs_each_alone():
    model = _CountingModel()

    async def main():
        b = DynamicBatcher(model, max_batch=1, timeout_s=0.05)
        await asyncio.gather(*(b.submit({"x": np.ones((1, 4), np.float32)}, 1) for _ in range(5)))
        await b.close()

    _run(main())
    assert model.calls == [1] * 5


def test_batcher_isolates_failing_request():
    model = _CountingModel(fail_on=-7.0)

    async def main():
        b = DynamicBatcher(model, max_batch=32, timeout_s=0.05)
        xs = [np.full((1, 4), float(i), np.float32) for i in range(5)]
        xs[2][0, 1] = -7.0
        outs = await asyncio.gather(*(b.submit({"x": x}, 1) for x in xs), return_exceptions=True)
        await b.close()
        return outs

    outs = _run(main())
    assert isinstance(outs[2], RuntimeError)
    assert [float(o["sum"][0]) for i, o in enumerate(outs) if i != 2] == [0.0, 4.0, 12.0, 16.0]
    assert model.calls[0] == 5  # the merged attempt, then one run per request
    assert model.calls[1:] == [1] * 5


def test_batcher_close_drains_queue_then_refuses():
    model = _CountingModel()

    async def main():
        b = DynamicBatcher(model, max_batch=2, timeout_s=10.0)  # long wait: close must not hang
        tasks = [
            asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}, 1)) for _ in range(5)
        ]
        await asyncio.sleep(0)  # one loop turn: every task has queued its request
        await asyncio.wait_for(b.close(), 5)
        outs = await asyncio.gather(*tasks)
        with pytest.raises(UnavailableError):
            await b.submit({"x": np.ones((1, 4), np.float32)}, 1)
        return outs

    outs = _run(main())
    assert len(outs) == 5 and sum(model.calls) == 5


async def _collecting(batcher: DynamicBatcher) -> None:
    """Until a worker of ``batcher`` has taken a request and waits for more to merge."""
    await async_wait_until(lambda: batcher._collecting > 0, 5, message="no worker collecting")


def test_batcher_flush_ends_the_batching_window():
    model = _CountingModel()

    async def main():
        b = DynamicBatcher(model, max_batch=8, timeout_s=30.0)
        task = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}, 1))
        await _collecting(b)  # the worker now waits up to 30 s for more requests
        assert not task.done()
        b.flush()
        out = await asyncio.wait_for(task, 5)  # answered without waiting the window out
        await b.close()
        return out

    out = _run(main())
    assert model.calls == [1] and out["y"].shape == (1, 4)


def test_batcher_reports_queue_depth():
    model = _CountingModel()
    depths: list[int] = []

    async def main():
        b = DynamicBatcher(model, max_batch=2, timeout_s=0.05, on_queue=depths.append)
        await asyncio.gather(*(b.submit({"x": np.ones((1, 4), np.float32)}, 1) for _ in range(5)))
        await b.close()
        return b.depth

    assert _run(main()) == 0
    assert max(depths) == 5 and depths[-1] == 0


def test_adaptive_policy_waits_only_for_expected_requests():
    model = _CountingModel()

    async def main():
        b = DynamicBatcher(model, max_batch=8, timeout_s=30.0, policy="adaptive")
        # nothing expected: the first request runs at once, not after 30 s
        await asyncio.wait_for(b.submit({"x": np.ones((1, 4), np.float32)}, 1), 5)
        # two requests announced: the batch waits for both, then runs once
        b.expect()
        b.expect()
        first = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}, 1, expected=True))
        await _collecting(b)
        assert not first.done()  # still waiting for the second expected request
        second = b.submit({"x": np.zeros((1, 4), np.float32)}, 1, expected=True)
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        # an announced request that fails before submit releases the wait
        b.expect()
        b.expect()
        third = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}, 1, expected=True))
        await _collecting(b)
        assert not third.done()
        b.unexpect()
        await asyncio.wait_for(third, 5)
        await b.close()

    _run(main())
    assert model.calls == [1, 2, 1]


def test_fast_model_runs_inline_after_warmup():
    threads: list[str] = []

    def fast(feed):
        threads.append(threading.current_thread().name)
        return {"y": feed["x"] + 1}

    async def main(inline_below_s):
        b = DynamicBatcher(fast, max_batch=1, timeout_s=0.0, inline_below_s=inline_below_s)
        for _ in range(8):
            out = await b.submit({"x": np.zeros((1, 2), np.float32)}, 1)
            np.testing.assert_array_equal(out["y"], np.ones((1, 2), np.float32))
        await b.close()

    _run(main(1.0))  # every run is far below 1 s: inline once the average exists
    assert all(t.startswith("bnexport-run") for t in threads[:4])
    assert threads[4:] == [threading.main_thread().name] * 4
    threads.clear()
    _run(main(0.0))  # never inline
    assert all(t.startswith("bnexport-run") for t in threads)
