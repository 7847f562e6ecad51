"""Helpers shared by the test files (one home each; import them from here).

- :func:`run_ort`, :func:`op_counts`: run an ONNX model on onnxruntime with every
  graph optimization off (onnxruntime's own fusions must not hide a broken pass),
  count its ops.
- :func:`wait_until` / :func:`async_wait_until`: poll a condition with a deadline
  (never a bare sleep), from a thread or on an event loop.
- :func:`running_server`: the KServe app in a uvicorn thread on a free port.
- :func:`metric`: one Prometheus sample; a missing sample fails the test.

``tests/`` is on ``sys.path`` (pytest inserts the folder of ``tests/conftest.py``), so
test files write ``from support import wait_until``.
"""

from support.onnx_run import op_counts, run_ort
from support.prometheus import metric
from support.servers import running_server
from support.waiting import async_wait_until, wait_until

__all__ = [
    "async_wait_until",
    "metric",
    "op_counts",
    "run_ort",
    "running_server",
    "wait_until",
]
