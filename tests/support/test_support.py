"""The shared helpers fail where a test must fail: a missing sample, a deadline passed."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from support import async_wait_until, metric, op_counts, run_ort, wait_until

TEXT = """\
# HELP bnexport_requests_total Inference requests.
# TYPE bnexport_requests_total counter
bnexport_requests_total{model="digits",version="2",status="200"} 3.0
bnexport_requests_total{model="digits",version="2",status="404"} 1.0
"""


def test_metric_reads_a_sample_and_fails_on_a_missing_one():
    assert metric(TEXT, "bnexport_requests_total", model="digits", status="200") == 3.0
    assert metric(TEXT, "bnexport_requests_total", {"model": "digits", "status": "404"}) == 1.0
    with pytest.raises(AssertionError, match="no sample bnexport_requests_total"):
        metric(TEXT, "bnexport_requests_total", model="digits", status="500")
    with pytest.raises(AssertionError, match="status"):  # lists the samples that exist
        metric(TEXT, "bnexport_requests_total", status="503")
    assert metric(TEXT, "bnexport_requests_total", status="500", default=0.0) == 0.0


def test_wait_until_returns_the_value_or_fails_after_the_deadline():
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    assert wait_until(flag.is_set, 5) is True
    with pytest.raises(AssertionError, match="after 0.05 s: never"):
        wait_until(lambda: None, 0.05, message=lambda: "never")


def test_async_wait_until_lets_the_loop_run():
    async def main():
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.02, done.set)
        assert await async_wait_until(done.is_set, 5)

        async def never() -> bool:
            return False

        with pytest.raises(AssertionError, match="after 0.05 s"):
            await async_wait_until(never, 0.05)

    asyncio.run(main())


def test_run_ort_runs_unoptimized_and_op_counts_counts():
    graph = oh.make_graph(
        [oh.make_node("Mul", ["x", "x"], ["y"]), oh.make_node("Mul", ["y", "x"], ["z"])],
        "cube",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    x = np.array([2.0, -3.0], np.float32)
    (z,) = run_ort(model, {"x": x})
    np.testing.assert_array_equal(z, x**3)  # exact: two float32 products of small integers
    assert op_counts(model) == {"Mul": 2} and op_counts(model)["Conv"] == 0


class _Item:
    """What ``pytest_runtest_setup`` reads of a test item: its markers."""

    def __init__(self, *markers: pytest.Mark) -> None:
        self.nodeid = "tests/x.py::test_x"
        self._markers = markers

    def iter_markers(self, name: str):
        return (m for m in self._markers if m.name == name)


@pytest.fixture()
def fake_capabilities(monkeypatch):
    from support import capabilities

    capabilities.missing.cache_clear()
    monkeypatch.setitem(capabilities.PROBES, "here", lambda: None)
    monkeypatch.setitem(capabilities.PROBES, "gone", lambda: "gone not installed")
    yield
    capabilities.missing.cache_clear()


def test_skip_reason_names_what_is_missing_and_what_was_not_verified(fake_capabilities):
    from support.capabilities import skip_reason

    assert skip_reason(_Item(pytest.mark.needs("here", unverified="x").mark)) is None
    reason = skip_reason(_Item(pytest.mark.needs("here", "gone", unverified="y").mark))
    assert reason == "needs gone (gone not installed): y not verified"
    assert skip_reason(_Item(pytest.mark.needs_absent("gone", why="error path").mark)) is None
    reason = skip_reason(_Item(pytest.mark.needs_absent("here", why="error path").mark))
    assert reason == "here present; error path"


def test_skip_reason_refuses_unknown_capabilities_and_missing_reasons(fake_capabilities):
    from support.capabilities import skip_reason

    with pytest.raises(KeyError, match="unknown capability 'tensorrtt'"):
        skip_reason(_Item(pytest.mark.needs("tensorrtt", unverified="z").mark))
    with pytest.raises(pytest.UsageError, match="without unverified="):
        skip_reason(_Item(pytest.mark.needs("here").mark))
    with pytest.raises(pytest.UsageError, match="without why="):
        skip_reason(_Item(pytest.mark.needs_absent("gone").mark))
