"""Effective bandwidth of the FusedNorm CUDA kernels (GPU only).

For each size (1-512 MiB of X), dtype (fp32/fp16), layout (NCHW/NHWC) and mode
(affine; batch_stats with the split and the one-kernel path) the kernel time is
measured with CUDA events and reported as effective GB/s = 2 * bytes(X) / time
(read X, write Y: the minimum traffic of either mode), beside a device-to-device
copy of the same bytes in the same run (same 2 * bytes), and beside
torch.nn.functional.batch_norm (cuDNN) in eval and train mode where torch with
CUDA is installed.

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


class _Timer:
    """CUDA-event timing of a callable enqueued on the default stream (median, ms)."""

    def __init__(self, drv, check):
        self.drv, self.check = drv, check
        self.start = check(drv.cuEventCreate(0), "cuEventCreate")
        self.end = check(drv.cuEventCreate(0), "cuEventCreate")

    def __call__(self, fn, warmup: int = 3, iters: int = 20) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            self.check(self.drv.cuEventRecord(self.start, self.drv.CUstream(0)), "cuEventRecord")
            fn()
            self.check(self.drv.cuEventRecord(self.end, self.drv.CUstream(0)), "cuEventRecord")
            self.check(self.drv.cuEventSynchronize(self.end), "cuEventSynchronize")
            times.append(
                self.check(self.drv.cuEventElapsedTime(self.start, self.end), "cuEventElapsedTime")
            )
        return statistics.median(times)


def _torch_times(shape, dtype_name, layout, iters):
    """(eval_ms, train_ms) of torch batch_norm, or (None, None) without torch+CUDA."""
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

        for _ in range(3):
            f()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            f()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[training] = statistics.median(times)
    x = None
    torch.cuda.empty_cache()
    return out[False], out[True]


def _bench_one(rt, drv, check, timer, mib, dtype, layout, iters, use_torch):
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
        check(drv.cuMemcpyDtoDAsync(y, x, nbytes, drv.CUstream(0)), "cuMemcpyDtoDAsync")

    copy_ms = timer(copy, iters=iters)
    t_eval, t_train = _torch_times(shape, dtype, layout, iters) if use_torch else (None, None)
    results = [("d2d copy", copy_ms, None)]
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
        ms = timer(lambda p=p: rt.launch(p, bufs), iters=iters)  # noqa: B023 - called right here
        rt.free(bufs.pop("ws"))
        results.append((name, ms, t_torch))
    if t_eval is not None:
        results += [("torch eval", t_eval, None), ("torch train", t_train, None)]
    for ptr in bufs.values():
        rt.free(ptr)
    rows = []
    for name, ms, t_torch in results:
        rows.append(
            {
                "mib": mib, "bytes": nbytes, "shape": list(shape), "dtype": dtype,
                "layout": layout, "case": name, "ms": ms,
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
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    from bnexport_plugins.fused_norm.gpu_runtime import FusedNormCuda, gpu_unavailable_reason

    from bnexport.runtime.cuda_api import check, driver

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"kernel_bench: needs a CUDA GPU ({reason}); nothing measured.", file=sys.stderr)
        return 2
    rt = FusedNormCuda(0)
    drv = driver()
    timer = _Timer(drv, check)
    k = rt.kernels
    print(
        f"GPU: {rt.name} ({rt.arch}, {rt.num_sms} SMs), driver CUDA {rt.driver_version}; "
        f"NVRTC {k.nvrtc_version}, {k.kind} for {k.arch}"
    )
    cols = f"{'MiB':>5} {'dtype':>8} {'layout':>6} {'case':>18} {'ms':>9} {'GB/s':>8}"
    header = f"{cols} {'%copy':>6} {'xtorch':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for mib in args.sizes_mib:
        for dtype in args.dtypes:
            for layout in args.layouts:
                new = _bench_one(
                    rt, drv, check, timer, mib, dtype, layout, args.iters, not args.no_torch
                )
                for r in new:
                    xt = "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}"
                    print(
                        f"{mib:>5} {dtype:>8} {layout:>6} {r['case']:>18} {r['ms']:>9.4f} "
                        f"{r['gb_per_s']:>8.1f} {r['pct_of_copy']:>6.1f} {xt:>7}"
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
            "results": rows,
        }
        path = os.path.abspath(args.json)
        write_text_atomic(path, json.dumps(doc, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
