"""Effective bandwidth of the FusedNorm CUDA kernels (GPU only).

For each size (1-512 MiB of X), dtype (fp32/fp16), layout (NCHW/NHWC) and mode
(affine; batch_stats with the split and the one-kernel path) the kernel time is
measured with CUDA events and reported as effective GB/s = 2 * bytes(X) / time
(read X, write Y: the minimum traffic of either mode), beside a device-to-device
copy of the same bytes in the same run (same 2 * bytes), and beside
torch.nn.functional.batch_norm (cuDNN) in eval and train mode where torch with
CUDA is installed.

Timing excludes Python (:class:`DeviceTimer`): each call's kernel arguments are built
once (``FusedNormCuda.prepare``), ``--reps`` back-to-back calls are captured into a
CUDA graph, and the graph is replayed between two events (``ms`` = per call, median of
``--iters`` replays). Launch overhead is reported apart: ``eager ms`` is the same calls
enqueued from Python back to back between events (the device timeline with launch
gaps), ``launch us`` the host time of one enqueue. torch is timed the same way
(``torch.cuda.CUDAGraph``), so neither side's Python dispatch is in ``ms``.

    python benchmarks/kernel_bench.py [--sizes-mib 1 4 16 64 256 512] [--json out.json]

Targets (issue 6): affine >= 90 % of copy at >= 64 MiB and >= 1.0x torch eval;
batch_stats >= 60 % of copy and >= 1.0x torch train.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _shape(nbytes: int, itemsize: int, layout: str) -> tuple[int, ...]:
    n, c, w = 8, 128, 32
    h = max(1, nbytes // itemsize // (n * c * w))
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


class DeviceTimer:
    """Device time of work enqueued on :attr:`stream`, without the host code that enqueues it.

    Args:
        drv: ``cuda.bindings.driver`` (current context set).
        check: :func:`bnexport.cuda_api.check`.
        reps: calls per CUDA graph and per eager burst.
    """

    def __init__(self, drv: Any, check: Callable[..., Any], reps: int = 20) -> None:
        self.drv, self.check, self.reps = drv, check, max(1, int(reps))
        self.stream = check(drv.cuStreamCreate(1), "cuStreamCreate")  # CU_STREAM_NON_BLOCKING
        self.start = check(drv.cuEventCreate(0), "cuEventCreate")
        self.end = check(drv.cuEventCreate(0), "cuEventCreate")

    def _elapsed(self, enqueue: Callable[[], None]) -> float:
        """ms between events recorded around ``enqueue()`` on the stream."""
        drv, check = self.drv, self.check
        check(drv.cuEventRecord(self.start, self.stream), "cuEventRecord")
        enqueue()
        check(drv.cuEventRecord(self.end, self.stream), "cuEventRecord")
        check(drv.cuEventSynchronize(self.end), "cuEventSynchronize")
        return float(check(drv.cuEventElapsedTime(self.start, self.end), "cuEventElapsedTime"))

    def _graph(self, enqueue: Callable[[], None]) -> tuple[Any, Any]:
        """A CUDA graph of ``reps`` back-to-back calls, captured from the stream."""
        drv, check = self.drv, self.check
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(drv.cuStreamBeginCapture(self.stream, mode), "cuStreamBeginCapture")
        try:
            for _ in range(self.reps):
                enqueue()
        finally:
            graph = check(drv.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        return graph, check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def measure(self, enqueue: Callable[[], None], iters: int = 20) -> dict[str, float]:
        """Per-call times of ``enqueue`` (which puts one call's work on :attr:`stream`).

        Returns:
            ``ms``: median over ``iters`` replays of a ``reps``-call CUDA graph, per call
            (kernel time, no launch gaps); ``eager_ms``: median of ``reps`` calls enqueued
            from Python back to back, per call; ``launch_us``: host time of one enqueue;
            ``overhead_us``: ``eager_ms - ms`` in microseconds (the launch gap a
            Python-driven call adds on the device timeline, 0 when the GPU stays busy).
        """
        drv, check = self.drv, self.check
        for _ in range(3):
            enqueue()
        check(drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

        def burst() -> None:
            for _ in range(self.reps):
                enqueue()

        host, eager = [], []
        for _ in range(max(3, iters // 4)):
            t0 = time.perf_counter()
            burst()
            host.append((time.perf_counter() - t0) / self.reps)
            check(drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
            eager.append(self._elapsed(burst) / self.reps)
        graph, exec_ = self._graph(enqueue)
        try:
            replay = lambda: check(drv.cuGraphLaunch(exec_, self.stream), "cuGraphLaunch")  # noqa: E731
            replay()
            times = [self._elapsed(replay) / self.reps for _ in range(iters)]
        finally:
            check(drv.cuGraphExecDestroy(exec_), "cuGraphExecDestroy")
            check(drv.cuGraphDestroy(graph), "cuGraphDestroy")
        ms, eager_ms = statistics.median(times), statistics.median(eager)
        return {
            "ms": ms,
            "eager_ms": eager_ms,
            "launch_us": statistics.median(host) * 1e6,
            "overhead_us": max(0.0, eager_ms - ms) * 1e3,
        }


def torch_graph_ms(torch: Any, fn: Callable[[], Any], reps: int, iters: int) -> float:
    """Per-call ms of ``fn`` (torch work) from a CUDA graph of ``reps`` calls (median)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch's docs require
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _torch_times(shape, dtype_name, layout, iters, reps):
    """(eval_ms, train_ms) of torch batch_norm from CUDA graphs, or (None, None)."""
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    dt = getattr(torch, dtype_name)
    nchw = shape if layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
    x = torch.randn(nchw, device="cuda", dtype=dt)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    c = nchw[1]
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    out = {}
    for training in (False, True):

        def f(training=training):
            torch.nn.functional.batch_norm(x, rm, rv, w, b, training=training, eps=1e-3)

        out[training] = torch_graph_ms(torch, f, reps, iters)
    x = None
    torch.cuda.empty_cache()
    return out[False], out[True]


def _bench_one(rt, drv, check, timer, mib, dtype, layout, iters, use_torch, reps):
    """Rows of one (size, dtype, layout): copy, the three kernel cases, torch."""
    from bnexport_plugins.fused_norm import spec
    from bnexport_plugins.fused_norm.checks import check_inputs
    from bnexport_plugins.fused_norm.launch import plan

    itemsize = np.dtype(_np_dtype(dtype)).itemsize
    shape = _shape(mib << 20, itemsize, layout)
    axis = 1 if layout == "NCHW" else 3
    nbytes = int(np.prod(shape)) * itemsize
    c = shape[axis]
    x, y = rt.alloc(nbytes), rt.alloc(nbytes)
    rng = np.random.default_rng(0)
    host = rng.standard_normal(min(int(np.prod(shape)), 1 << 20)).astype(np.float32)
    host = host.astype(_np_dtype(dtype))  # kept alive across the copy below
    check(drv.cuMemsetD8(x, 0, nbytes), "cuMemsetD8")
    check(drv.cuMemcpyHtoD(x, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")
    bufs = {"x": x, "y": y, "mean": rt.alloc(4 * c), "var": rt.alloc(4 * c)}
    bufs["scale"], bufs["shift"] = (
        rt.upload(np.ones(c, np.float32)),
        rt.upload(np.zeros(c, np.float32)),
    )

    def copy():
        check(drv.cuMemcpyDtoDAsync(y, x, nbytes, timer.stream), "cuMemcpyDtoDAsync")

    copy_t = timer.measure(copy, iters=iters)
    copy_ms = copy_t["ms"]
    t_eval, t_train = _torch_times(shape, dtype, layout, iters, reps) if use_torch else (None, None)
    results = [("d2d copy", copy_t, None)]
    for name, strategy, t_torch in [
        ("affine", "split", t_eval),
        ("batch_stats/split", "split", t_train),
        ("batch_stats/fused", "fused", t_train),
    ]:
        mode = name.split("/")[0]
        attrs = {**spec.ATTRIBUTE_DEFAULTS, "axis": axis, "mode": mode, "activation": "relu"}
        attrs = spec.validate_attributes(attrs)
        p = plan(check_inputs(shape, dtype, (c,), (c,), attrs), dtype, attrs, rt.num_sms, strategy)
        bufs["ws"] = rt.alloc(p.workspace_bytes)
        prepared = rt.prepare(p, bufs, timer.stream)  # arguments built once, outside timing
        t = timer.measure(prepared, iters=iters)
        t["kernels"] = len(p.launches)
        rt.free(bufs.pop("ws"))
        results.append((name, t, t_torch))
    if t_eval is not None:
        results += [("torch eval", {"ms": t_eval}, None), ("torch train", {"ms": t_train}, None)]
    for ptr in bufs.values():
        rt.free(ptr)
    rows = []
    for name, t, t_torch in results:
        ms = t["ms"]
        rows.append(
            {
                "mib": mib, "bytes": nbytes, "shape": list(shape), "dtype": dtype,
                "layout": layout, "case": name, "ms": ms,
                "eager_ms": t.get("eager_ms"), "launch_us": t.get("launch_us"),
                "overhead_us": t.get("overhead_us"), "kernels": t.get("kernels"),
                "gb_per_s": 2 * nbytes / (ms * 1e-3) / 1e9,
                "pct_of_copy": 100.0 * copy_ms / ms,
                "speedup_vs_torch": (t_torch / ms) if t_torch else None,
            }
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256, 512])
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float16"],
        choices=["float32", "float16", "bfloat16"],
    )
    ap.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"], choices=["NCHW", "NHWC"])
    ap.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    ap.add_argument("--reps", type=int, default=20, help="back-to-back calls per graph/burst")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    from bnexport_plugins.fused_norm.gpu_runtime import FusedNormCuda, gpu_unavailable_reason

    from bnexport.cuda_api import check, driver

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"kernel_bench: needs a CUDA GPU ({reason}); nothing measured.", file=sys.stderr)
        return 2
    rt = FusedNormCuda(0)
    drv = driver()
    timer = DeviceTimer(drv, check, reps=args.reps)
    k = rt.kernels
    print(
        f"GPU: {rt.name} ({rt.arch}, {rt.num_sms} SMs), driver CUDA {rt.driver_version}; "
        f"NVRTC {k.nvrtc_version}, {k.kind} for {k.arch}"
    )
    cols = f"{'MiB':>5} {'dtype':>8} {'layout':>6} {'case':>18} {'ms':>9} {'GB/s':>8}"
    header = f"{cols} {'%copy':>6} {'xtorch':>7} {'eager ms':>9} {'launch us':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for mib in args.sizes_mib:
        for dtype in args.dtypes:
            for layout in args.layouts:
                new = _bench_one(
                    rt,
                    drv,
                    check,
                    timer,
                    mib,
                    dtype,
                    layout,
                    args.iters,
                    not args.no_torch,
                    args.reps,
                )
                for r in new:
                    xt = "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}"
                    eager = "" if r["eager_ms"] is None else f"{r['eager_ms']:.4f}"
                    host = "" if r["launch_us"] is None else f"{r['launch_us']:.1f}"
                    print(
                        f"{mib:>5} {dtype:>8} {layout:>6} {r['case']:>18} {r['ms']:>9.4f} "
                        f"{r['gb_per_s']:>8.1f} {r['pct_of_copy']:>6.1f} {xt:>7} "
                        f"{eager:>9} {host:>9}"
                    )
                rows += new
    if args.json:
        from bnexport.atomic_write import write_text_atomic

        doc = {
            "gpu": rt.name,
            "arch": rt.arch,
            "sms": rt.num_sms,
            "driver_cuda": rt.driver_version,
            "nvrtc": list(rt.kernels.nvrtc_version),
            "image": {"kind": rt.kernels.kind, "target": rt.kernels.arch},
            "timing": {
                "ms": "per call, CUDA graph of --reps calls replayed between events (median)",
                "eager_ms": "per call, --reps calls enqueued from Python between events",
                "launch_us": "host time of one enqueue (cuLaunchKernel via cuda-bindings)",
                "reps": args.reps,
                "iters": args.iters,
            },
            "results": rows,
        }
        path = os.path.abspath(args.json)
        write_text_atomic(path, json.dumps(doc, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
