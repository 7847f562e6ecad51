"""FusedNorm CUDA kernels vs ``torch.nn.functional.batch_norm`` (cuDNN) on the same tensors.

For every size (MiB of X), dtype and layout, X is created once on the GPU by torch, with the
shapes of ``kernel_bench.py`` (``N=8, C=128``, NCHW or NHWC), and both implementations run on
that memory, on torch's current stream:

* **eval**: ``batch_norm(training=False)`` with running statistics vs our ``affine`` mode with
  ``scale = γ/√(var+ε)``, ``shift = β − μ·scale`` (``fold_math.bn_scale_shift``, float64, as the
  exporter folds them);
* **train**: ``batch_norm(training=True)`` vs our ``batch_stats`` mode (``split`` and ``fused``
  strategies, ``return_stats=1``); the running statistics torch updates are compared with the
  ones implied by our batch mean/variance (momentum 0.1, unbiased ``n/(n−1)`` correction).

Numerics: ``|ours − torch| ≤ atol + rtol·|torch|`` elementwise (:data:`TOL`). Time: CUDA events,
ours and torch interleaved, median of ``--iters``; ``x torch`` is ``torch_ms / ours_ms`` (> 1:
ours faster) and GB/s counts ``2·bytes(X)`` (read X, write Y).

    python benchmarks/gpu_check.py [--sizes-mib 4 64 256] [--json out.json]

Exit status: 0 when every comparison is within tolerance, 1 when one is not, 2 without a GPU.
Imports torch and CUDA only inside :func:`main`, so it imports anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import _shape  # noqa: E402 - the benchmark's shapes, one definition

#: (rtol, atol) per dtype, for Y (values O(10) in, O(1) out): float32 kernel math vs cuDNN,
#: one rounding to the dtype each, so 16-bit outputs may differ by ~1 ulp.
TOL = {"float32": (1e-4, 1e-4), "float16": (4e-3, 4e-3), "bfloat16": (3.2e-2, 3.2e-2)}
#: relative tolerance of batch mean/variance and of the running statistics (float32 moments)
STATS_RTOL = 1e-4
EPS = 1e-3
MOMENTUM = 0.1
OFFSET = 3.0  # X ~ 2·N(0, 1) + OFFSET: a mean away from zero exercises stable variances


def affine_params(
    mean: np.ndarray, var: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, shift)`` of an eval-mode BN, folded in float64 like the exporter."""
    from bnexport.export.fold_math import bn_scale_shift

    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps, name="gpu_check")
    return scale.astype(np.float32), shift.astype(np.float32)


def expected_running(
    running: tuple[np.ndarray, np.ndarray],
    batch: tuple[np.ndarray, np.ndarray],
    count: int,
    momentum: float = MOMENTUM,
) -> tuple[np.ndarray, np.ndarray]:
    """Running (mean, var) after one torch training step, from our biased batch moments.

    torch: ``r ← (1 − m)·r + m·s`` with the *unbiased* batch variance ``var·n/(n−1)``.
    """
    (r_mean, r_var), (b_mean, b_var) = running, batch
    b_mean, b_var = np.asarray(b_mean, np.float64), np.asarray(b_var, np.float64)
    unbiased = b_var * count / max(count - 1, 1)
    return (
        (1 - momentum) * np.asarray(r_mean, np.float64) + momentum * b_mean,
        (1 - momentum) * np.asarray(r_var, np.float64) + momentum * unbiased,
    )


def within(got: Any, want: Any, rtol: float, atol: float) -> tuple[bool, float, float]:
    """(ok, max |got − want|, max |got − want| / (atol + rtol·|want|)) for torch tensors."""
    diff = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    nan = bool(got.isnan().any() or want.isnan().any())
    worst = float((diff / bound).max())
    return (not nan and worst <= 1.0), float(diff.max()), worst


def _bits(value: float) -> str:
    return f"{value:.2e}"


class _Case:
    """One (size, dtype, layout): torch tensors and our launch buffers over the same memory."""

    def __init__(self, torch: Any, rt: Any, mib: int, dtype: str, layout: str, seed: int = 0):
        self.torch, self.rt = torch, rt
        self.dtype, self.layout = dtype, layout
        tdt = getattr(torch, dtype)
        itemsize = torch.empty((), dtype=tdt).element_size()
        self.shape = _shape(mib << 20, itemsize, layout)
        self.axis = 1 if layout == "NCHW" else 3
        self.c = self.shape[self.axis]
        self.nbytes = int(np.prod(self.shape)) * itemsize
        self.count = int(np.prod(self.shape)) // self.c
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.x = (torch.randn(self.shape, device="cuda", generator=g) * 2 + OFFSET).to(tdt)
        self.y = torch.empty_like(self.x)
        rng = np.random.default_rng(seed)
        self.gamma = rng.uniform(0.5, 1.5, self.c).astype(np.float32)
        self.beta = rng.standard_normal(self.c).astype(np.float32)
        self.r_mean = (OFFSET + 0.1 * rng.standard_normal(self.c)).astype(np.float32)
        self.r_var = rng.uniform(3.0, 5.0, self.c).astype(np.float32)
        scale, shift = affine_params(self.r_mean, self.r_var, self.gamma, self.beta, EPS)
        f32 = {"device": "cuda", "dtype": torch.float32}
        # running statistics for eval (never modified) and for timing train steps (updated)
        self.running = (torch.tensor(self.r_mean, **f32), torch.tensor(self.r_var, **f32))
        self.scratch = (self.running[0].clone(), self.running[1].clone())
        self.t = {
            "gamma": torch.tensor(self.gamma, **f32),
            "beta": torch.tensor(self.beta, **f32),
            "scale": torch.tensor(scale, **f32),
            "shift": torch.tensor(shift, **f32),
            "mean": torch.empty(self.c, **f32),
            "var": torch.empty(self.c, **f32),
        }

    def nchw(self, t: Any) -> Any:
        """The NCHW view torch's batch_norm takes (channels_last memory for NHWC)."""
        return t if self.layout == "NCHW" else t.permute(0, 3, 1, 2)

    def torch_bn(self, training: bool, running: tuple[Any, Any] | None = None) -> Any:
        """torch's batch_norm on X; returns Y in X's layout.

        ``running``: the (mean, var) tensors a training step updates (default: scratch
        copies, so timed steps allocate nothing); eval uses the original statistics.
        """
        rm, rv = running or (self.scratch if training else self.running)
        y = self.torch.nn.functional.batch_norm(
            self.nchw(self.x),
            rm,
            rv,
            self.t["gamma"],
            self.t["beta"],
            training=training,
            momentum=MOMENTUM,
            eps=EPS,
        )
        return y if self.layout == "NCHW" else y.permute(0, 2, 3, 1)

    def plan(self, mode: str, strategy: str) -> Any:
        from bnexport_plugins.fused_norm import spec
        from bnexport_plugins.fused_norm.checks import check_inputs
        from bnexport_plugins.fused_norm.launch import plan

        attrs = {**spec.ATTRIBUTE_DEFAULTS, "axis": self.axis, "mode": mode, "epsilon": EPS}
        if mode == "batch_stats":
            attrs["return_stats"] = 1
        attrs = spec.validate_attributes(attrs)
        geo = check_inputs(self.shape, self.dtype, (self.c,), (self.c,), attrs)
        return plan(geo, self.dtype, attrs, self.rt.num_sms, strategy)

    def ours(self, p: Any, mode: str, ws: Any) -> None:
        """Enqueue our kernels on torch's current stream (Y, and mean/var in batch_stats)."""
        t = self.t
        bufs = {
            "x": self.x.data_ptr(),
            "y": self.y.data_ptr(),
            "scale": (t["scale"] if mode == "affine" else t["gamma"]).data_ptr(),
            "shift": (t["shift"] if mode == "affine" else t["beta"]).data_ptr(),
            "mean": t["mean"].data_ptr(),
            "var": t["var"].data_ptr(),
            "ws": ws.data_ptr() if ws is not None else 0,
        }
        self.rt.launch(p, bufs, stream=self.torch.cuda.current_stream().cuda_stream)


def _time_pair(torch: Any, fns: dict[str, Any], iters: int) -> dict[str, float]:
    """Median CUDA-event ms of each callable, interleaved round by round (3 warm-ups)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        for name, fn in fns.items():
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(v) for name, v in times.items()}


def check_case(torch: Any, rt: Any, mib: int, dtype: str, layout: str, iters: int) -> list[dict]:
    """Rows (one per comparison) for one size/dtype/layout."""
    case = _Case(torch, rt, mib, dtype, layout)
    rtol, atol = TOL[dtype]
    rows = []
    base = {"mib": mib, "shape": list(case.shape), "dtype": dtype, "layout": layout}

    # eval: affine vs batch_norm(training=False)
    p = case.plan("affine", "split")
    case.ours(p, "affine", None)
    want = case.torch_bn(False)
    ok, max_abs, worst = within(case.y, want, rtol, atol)
    ms = _time_pair(
        torch,
        {"ours": lambda: case.ours(p, "affine", None), "torch": lambda: case.torch_bn(False)},
        iters,
    )
    rows.append(
        {
            **base,
            "case": "eval (affine)",
            "ok": ok,
            "max_abs": max_abs,
            "worst": worst,
            "ms": ms["ours"],
            "torch_ms": ms["torch"],
        }
    )

    # train: batch_stats (split, fused) vs batch_norm(training=True)
    f32 = {"device": "cuda", "dtype": torch.float32}
    rm, rv = torch.tensor(case.r_mean, **f32), torch.tensor(case.r_var, **f32)
    want = case.torch_bn(True, (rm, rv))
    for strategy in ("split", "fused"):
        p = case.plan("batch_stats", strategy)
        ws = torch.empty(max(p.workspace_floats, 1), **f32) if p.workspace_floats else None
        case.y.zero_()
        case.ours(p, "batch_stats", ws)
        ok_y, max_abs, worst = within(case.y, want, rtol, atol)
        mean, var = case.t["mean"].cpu().numpy(), case.t["var"].cpu().numpy()
        e_mean, e_var = expected_running((case.r_mean, case.r_var), (mean, var), case.count)
        ok_rm = np.allclose(rm.cpu().numpy(), e_mean, rtol=STATS_RTOL, atol=1e-5)
        ok_rv = np.allclose(rv.cpu().numpy(), e_var, rtol=STATS_RTOL, atol=1e-5)
        ms = _time_pair(
            torch,
            {
                "ours": lambda p=p, ws=ws: case.ours(p, "batch_stats", ws),  # noqa: B023
                "torch": lambda: case.torch_bn(True),
            },
            iters,
        )
        rows.append(
            {
                **base,
                "case": f"train ({strategy})",
                "ok": bool(ok_y and ok_rm and ok_rv),
                "max_abs": max_abs,
                "worst": worst,
                "running_stats_ok": bool(ok_rm and ok_rv),
                "ms": ms["ours"],
                "torch_ms": ms["torch"],
            }
        )
    for r in rows:
        r["gb_per_s"] = 2 * case.nbytes / (r["ms"] * 1e-3) / 1e9
        r["x_torch"] = r["torch_ms"] / r["ms"]
    return rows


def summarize_junit(path: str | Path) -> dict[str, int] | None:
    """``{tests, failures, errors, skipped}`` of a pytest ``--junitxml`` file (None if absent)."""
    import xml.etree.ElementTree as ET

    path = Path(path)
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def environment(torch: Any, rt: Any) -> dict[str, Any]:
    """What ran: GPU, driver, NVRTC, kernel image, torch/cuDNN versions."""
    return {
        "gpu": rt.name,
        "arch": rt.arch,
        "sms": rt.num_sms,
        "driver_cuda": rt.driver_version,
        "nvrtc": list(rt.kernels.nvrtc_version),
        "image": {"kind": rt.kernels.kind, "target": rt.kernels.arch},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[4, 64, 256])
    ap.add_argument(
        "--dtypes", nargs="+", default=["float32", "float16", "bfloat16"], choices=sorted(TOL)
    )
    ap.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"], choices=["NCHW", "NHWC"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--junit", metavar="XML", help="pytest --junitxml of the GPU tests to include")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    from bnexport_plugins.fused_norm.gpu_runtime import FusedNormCuda, gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        try:
            import torch
        except ImportError:
            reason = "torch is not installed"
        else:
            if not torch.cuda.is_available():
                reason = "torch sees no CUDA device"
    if reason is not None:
        print(
            f"gpu_check: needs a CUDA GPU and torch ({reason}); nothing compared.", file=sys.stderr
        )
        return 2
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.init()
    rt = FusedNormCuda(0)
    env = environment(torch, rt)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    header = (
        f"{'MiB':>4} {'dtype':>8} {'layout':>6} {'case':>14} {'ok':>3} {'max|d|':>9} "
        f"{'ms':>8} {'torch ms':>8} {'x torch':>7} {'GB/s':>7}"
    )
    print(header)
    print("-" * len(header))
    t0 = time.perf_counter()
    rows = []
    for mib in args.sizes_mib:
        for dtype in args.dtypes:
            for layout in args.layouts:
                for r in check_case(torch, rt, mib, dtype, layout, args.iters):
                    print(
                        f"{mib:>4} {dtype:>8} {layout:>6} {r['case']:>14} "
                        f"{'yes' if r['ok'] else 'NO':>3} {_bits(r['max_abs']):>9} "
                        f"{r['ms']:>8.4f} {r['torch_ms']:>8.4f} {r['x_torch']:>7.2f} "
                        f"{r['gb_per_s']:>7.0f}"
                    )
                    rows.append(r)
                torch.cuda.empty_cache()
    failed = [r for r in rows if not r["ok"]]
    doc = {
        "environment": env,
        "tolerances": {"y": TOL, "stats_rtol": STATS_RTOL, "epsilon": EPS},
        "gpu_tests": summarize_junit(args.junit) if args.junit else None,
        "comparisons": rows,
        "failed": len(failed),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"{len(rows) - len(failed)}/{len(rows)} comparisons within tolerance "
        f"({doc['seconds']:.1f} s)"
    )
    if args.json:
        from bnexport.atomic_write import write_text_atomic

        print(f"wrote {write_text_atomic(args.json, json.dumps(doc, indent=1))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
