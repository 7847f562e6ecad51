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

Numerics: ``|ours − torch| ≤ atol + rtol·|torch|`` elementwise (:data:`TOL`). Time, without
Python on either side: our kernel arguments are built once (``FusedNormCuda.prepare``), and
each side's ``--reps`` back-to-back calls are captured into a CUDA graph
(``kernel_bench.torch_graph_ms``) replayed between events, median of ``--iters``;
``x torch`` is ``torch_ms / ours_ms`` (> 1: ours faster) and GB/s counts ``2·bytes(X)``
(read X, write Y). ``launch_us`` is the host time of one of our enqueues, reported apart.

    python benchmarks/gpu_check.py [--sizes-mib 4 64 256] [--json out.json]
    python benchmarks/gpu_check.py --deps [--wheels DIR] [--install-list FILE]

Exit status: 0 when every comparison is within tolerance, 1 when one is not, 2 without a GPU.
Imports torch and CUDA only inside :func:`main`, so it imports anywhere.

``--deps`` (standard library only, so it runs before NumPy is known to be there) checks
every dependency of the GPU check up front (:data:`REQUIREMENTS`, plus NVRTC, the
driver and torch's CUDA as probes), names what is missing and whether the offline wheel
folder (``benchmarks/prepare_gpu_wheels.sh``) carries it; ``--install-list`` receives
the distributions to install from that folder. NumPy, torch and NVRTC are never carried:
NumPy must be torch's own (a second NumPy beside torch's breaks one of them), torch and
the NVRTC wheel (58 MB) are too large for the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

try:
    import numpy as np
except ImportError:  # only --deps runs without NumPy (it reports it missing)
    np = None  # type: ignore[assignment]

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _shape(nbytes: int, itemsize: int, layout: str) -> tuple[int, ...]:
    """kernel_bench's shapes (one definition there; imported late: it needs NumPy)."""
    from kernel_bench import _shape as shape

    return shape(nbytes, itemsize, layout)


def torch_graph_ms(torch: Any, fn: Any, reps: int, iters: int) -> float:
    """kernel_bench's CUDA-graph timing of torch work (one definition there)."""
    from kernel_bench import torch_graph_ms as timed

    return timed(torch, fn, reps, iters)


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One import the GPU check needs.

    Attributes:
        module: the import name.
        dist: the distribution that installs it.
        carry: whether the offline wheel folder may bring it.
        why: what needs it.
        required: ``False``: reported when missing, but the steps that do not need it run.
    """

    module: str
    dist: str
    carry: bool
    why: str
    required: bool = True


#: Everything the GPU check imports (tests, kernel_bench.py, this file), transitive
#: dependencies included, so an offline ``pip install --no-deps`` of the missing ones works.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("numpy", "numpy", False, "bnexport.runtime, tests, benchmarks (torch's own)"),
    Requirement("ml_dtypes", "ml-dtypes", True, "bfloat16 test data"),
    Requirement("pytest", "pytest", True, "the GPU tests"),
    Requirement("pluggy", "pluggy", True, "pytest"),
    Requirement("iniconfig", "iniconfig", True, "pytest"),
    Requirement("packaging", "packaging", True, "pytest"),
    Requirement("pygments", "pygments", True, "pytest"),
    Requirement("cuda.bindings", "cuda-bindings", True, "CUDA driver API and NVRTC (13.x)"),
    Requirement("cuda.pathfinder", "cuda-pathfinder", True, "cuda-bindings 13 (finds NVRTC)"),
    Requirement(
        "torch", "torch", False, "gpu_check.py's cuDNN reference, kernel_bench's torch", False
    ),
)
#: carried too, but a checkout works without it (plugins/ linked as bnexport_plugins)
BNEXPORT = Requirement("bnexport_plugins", "bnexport", True, "the package under test")


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_for(dist: str, wheels: Path | None) -> Path | None:
    """The wheel of ``dist`` in the folder (``name-version-...whl``, names normalized)."""
    if wheels is None or not wheels.is_dir():
        return None
    norm = re.sub(r"[-_.]+", "_", dist).lower()
    found = sorted(
        p
        for p in wheels.glob("*.whl")
        if re.sub(r"[-_.]+", "_", p.name.split("-")[0]).lower() == norm
    )
    return found[-1] if found else None


def _probes() -> list[tuple[str, bool, str]]:
    """(what, ok, detail) for what an import cannot tell: NVRTC, the driver, torch's CUDA."""
    rows = []
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
        rows.append(("NVRTC", int(err) == 0 and major == 13, f"{major}.{minor}"))
    except Exception as exc:  # noqa: BLE001 - a missing library is the finding
        rows.append(("NVRTC", False, f"not loadable ({exc}); install nvidia-cuda-nvrtc 13"))
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        rows.append(
            ("CUDA driver", int(err) == 0, f"CUDA {version // 1000}.{version % 1000 // 10}")
        )
    except Exception as exc:  # noqa: BLE001
        rows.append(("CUDA driver", False, f"none ({exc})"))
    try:
        from cuda.bindings import nvjitlink

        rows.append(("nvJitLink (optional)", True, str(nvjitlink.version())))
    except Exception as exc:  # noqa: BLE001 - optional: the ptxas checks skip
        rows.append(("nvJitLink (optional)", True, f"absent, PTX-assembly tests skip ({exc})"))
    if _find("torch"):
        try:
            import torch

            cuda = torch.cuda.is_available()
            rows.append(
                ("torch CUDA", cuda, f"torch {torch.__version__}, CUDA {torch.version.cuda}")
            )
        except Exception as exc:  # noqa: BLE001
            rows.append(("torch CUDA", False, f"import failed ({exc})"))
    return rows


def check_dependencies(
    wheels: Path | None, probe: bool = True
) -> tuple[list[str], list[str], list[str]]:
    """Check every requirement; returns ``(report lines, dists to install, fatal problems)``.

    A missing carried requirement whose wheel is in ``wheels`` goes to the install list;
    anything else missing is fatal (named with what needs it). ``cuda-bindings`` must
    be 13.x (NVRTC 13). The wheels are built for CPython 3.12 (x86_64 manylinux).
    """
    lines = [f"python {platform.python_version()} ({sys.executable}), wheels: {wheels or 'none'}"]
    install: list[str] = []
    fatal: list[str] = []
    for req in (*REQUIREMENTS, BNEXPORT):
        found = _find(req.module)
        version = _version(req.dist) if found else None
        wheel = wheel_for(req.dist, wheels) if req.carry and not found else None
        if found:
            state = f"ok {version or ''}".rstrip()
        elif wheel is not None:
            state = f"MISSING -> install {wheel.name}"
            install.append(req.dist)
        elif req is BNEXPORT:
            state = "not installed -> the checkout (plugins/ linked as bnexport_plugins)"
        elif not req.required:
            state = f"MISSING (optional: {req.why} will not run)"
        else:
            state = "MISSING" + ("" if req.carry else " (never carried)")
            fatal.append(f"{req.dist} ({req.why})")
        lines.append(f"  {req.dist:<16} {req.module:<18} {state}")
        if req.dist == "cuda-bindings" and version and not version.startswith("13."):
            fatal.append(f"cuda-bindings {version}: 13.x needed (NVRTC 13)")
    if install and sys.version_info[:2] != (3, 12):
        here = platform.python_version()
        fatal.append(f"the wheel folder holds CPython 3.12 wheels; this is Python {here}")
    if probe:
        for what, ok, detail in _probes():
            lines.append(f"  {what:<35} {'ok' if ok else 'MISSING'} {detail}")
            if not ok and what == "NVRTC":
                fatal.append(f"NVRTC 13 ({detail})")
    return lines, install, fatal


def installed_matches_tree(repo: Path) -> list[str]:
    """Files of the installed bnexport / bnexport_plugins that differ from the checkout."""
    import bnexport_plugins

    import bnexport

    pairs = [
        (Path(bnexport.__file__).parent, repo / "bnexport"),
        (Path(bnexport_plugins.__file__).parent, repo / "plugins"),
    ]
    stale = []
    for installed, tree in pairs:
        if installed.resolve() == tree.resolve():
            continue
        for src in sorted(tree.rglob("*")):
            if src.suffix not in (".py", ".cu") or "__pycache__" in src.parts:
                continue
            dst = installed / src.relative_to(tree)
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                stale.append(str(src.relative_to(repo)))
    return stale


def _deps_main(args: argparse.Namespace) -> int:
    wheels = Path(args.wheels) if args.wheels else None
    lines, install, fatal = check_dependencies(wheels, probe=not args.no_probe)
    print("\n".join(lines))
    if args.install_list:
        Path(args.install_list).write_text("".join(f"{d}\n" for d in install))
    if args.against_tree:
        stale = installed_matches_tree(Path(args.against_tree))
        if stale:
            fatal.append(
                f"the installed bnexport differs from the checkout ({len(stale)} file(s), "
                f"e.g. {stale[0]}): rerun benchmarks/prepare_gpu_wheels.sh"
            )
    if install:
        print(f"to install from the wheel folder: {' '.join(install)}")
    for problem in fatal:
        print(f"missing: {problem}", file=sys.stderr)
    return 1 if fatal else 0


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
        self.prepared(p, mode, ws)(self.torch.cuda.current_stream().cuda_stream)

    def prepared(self, p: Any, mode: str, ws: Any) -> Any:
        """Our launches with their arguments built once (called with a stream to enqueue)."""
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
        return self.rt.prepare(p, bufs, stream=self.torch.cuda.current_stream().cuda_stream)


def _time_pair(
    torch: Any, case: _Case, p: Any, mode: str, ws: Any, torch_fn: Any, iters: int, reps: int
) -> dict[str, float]:
    """Per-call ms of ours and torch's from CUDA graphs (no Python inside the timing).

    Also ``launch_us``: the host time of one of our enqueues (launch overhead, apart).
    """
    prepared = case.prepared(p, mode, ws)

    def ours() -> None:
        prepared(torch.cuda.current_stream().cuda_stream)  # the capture stream when capturing

    ours()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        prepared()
    launch_us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return {
        "ours": torch_graph_ms(torch, ours, reps, iters),
        "torch": torch_graph_ms(torch, torch_fn, reps, iters),
        "launch_us": launch_us,
    }


def check_case(
    torch: Any, rt: Any, mib: int, dtype: str, layout: str, iters: int, reps: int = 20
) -> list[dict]:
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
    ms = _time_pair(torch, case, p, "affine", None, lambda: case.torch_bn(False), iters, reps)
    rows.append(
        {
            **base,
            "case": "eval (affine)",
            "ok": ok,
            "max_abs": max_abs,
            "worst": worst,
            "ms": ms["ours"],
            "torch_ms": ms["torch"],
            "launch_us": ms["launch_us"],
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
        ms = _time_pair(torch, case, p, "batch_stats", ws, lambda: case.torch_bn(True), iters, reps)
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
                "launch_us": ms["launch_us"],
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
    ap.add_argument("--deps", action="store_true", help="only check the dependencies")
    ap.add_argument("--wheels", metavar="DIR", help="--deps: the offline wheel folder")
    ap.add_argument("--install-list", metavar="FILE", help="--deps: write dists to install")
    ap.add_argument("--no-probe", action="store_true", help="--deps: imports only, no probes")
    ap.add_argument(
        "--against-tree", metavar="REPO", help="--deps: the installed bnexport must match it"
    )
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[4, 64, 256])
    ap.add_argument(
        "--dtypes", nargs="+", default=["float32", "float16", "bfloat16"], choices=sorted(TOL)
    )
    ap.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"], choices=["NCHW", "NHWC"])
    ap.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    ap.add_argument("--reps", type=int, default=20, help="back-to-back calls per CUDA graph")
    ap.add_argument("--junit", metavar="XML", help="pytest --junitxml of the GPU tests to include")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.deps:
        return _deps_main(args)

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
                for r in check_case(torch, rt, mib, dtype, layout, args.iters, args.reps):
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
