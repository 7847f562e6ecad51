"""The CUDA kernels on a real GPU vs the NumPy reference: every mode, dtype, layout, path."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from bnexport_plugins.fused_norm.reference import fused_norm
from kernel_cases import DTYPES, make_case, stats_atol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.needs("cuda_gpu", unverified="kernel numerics vs reference"),
]

# |y - ref| <= atol + rtol * |ref|; the reference is float64 rounded once to the dtype, the
# kernels use float32 math (and float32 moments), so 16-bit outputs may differ by ~1 ulp.
TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}
STATS_TOL = 2e-5  # relative, float32 Welford/Chan vs float64 two-pass
LAYOUTS = {
    "NCHW": ((4, 16, 9, 13), 1),
    "NHWC": ((4, 9, 13, 16), 3),
    "NC": ((64, 40), 1),
    "NxC3": ((8, 7, 5, 24), 3),
    "N_C_mid": ((6, 5, 12, 7), 2),
    "NCHW_vec": ((2, 8, 32, 32), 1),
}
ACTS = ["none", "relu", "relu6", "leaky_relu", "sigmoid", "silu"]


_inputs = functools.partial(make_case, offset=3.0)


def _assert_close(got, want, dtype, extra_atol=0.0):
    rtol, atol = TOL[dtype]
    atol += extra_atol
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(
        got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_affine(layout, dtype, act, misaligned):
    from bnexport_plugins.fused_norm.gpu_runtime import run_numpy

    shape, axis = LAYOUTS[layout]
    x, s, b = _inputs(shape, axis, dtype)
    attrs = {"axis": axis, "activation": act, "alpha": 0.2}
    got = run_numpy(
        x, s, b, x_byte_offset=x.itemsize if misaligned else 0, **attrs
    )  # not 16B-aligned
    _assert_close(got, fused_norm(x, s, b, **attrs), dtype)


@pytest.mark.parametrize("strategy", ["split", "fused"])
@pytest.mark.parametrize("vbs", [0, 2])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_stats(layout, dtype, vbs, strategy):
    from bnexport_plugins.fused_norm.gpu_runtime import run_numpy

    shape, axis = LAYOUTS[layout]
    x, s, b = _inputs(shape, axis, dtype, offset=50.0)  # a large mean: needs a stable variance
    attrs = {"axis": axis, "mode": "batch_stats", "virtual_batch_size": vbs, "return_stats": 1,
             "activation": "silu", "epsilon": 1e-3}  # fmt: skip
    y, mean, var = run_numpy(x, s, b, strategy=strategy, **attrs)
    want_y, want_mean, want_var = fused_norm(x, s, b, **attrs)
    _assert_close(y, want_y, dtype, stats_atol(x, s, axis, vbs))
    np.testing.assert_allclose(mean, want_mean, rtol=STATS_TOL, atol=1e-5)
    np.testing.assert_allclose(var, want_var, rtol=1e-4, atol=1e-5)
    y_only = run_numpy(x, s, b, strategy=strategy, **{**attrs, "return_stats": 0})
    np.testing.assert_array_equal(y_only.astype(np.float64), y.astype(np.float64))


@pytest.mark.parametrize("strategy", ["split", "fused"])
def test_batch_stats_large_tensor_many_partials(strategy):
    from bnexport_plugins.fused_norm.gpu_runtime import run_numpy

    x, s, b = _inputs((32, 8, 64, 64), 1, "float32", offset=1000.0)
    attrs = {"mode": "batch_stats", "return_stats": 1}
    y, mean, var = run_numpy(x, s, b, strategy=strategy, **attrs)
    want_y, want_mean, want_var = fused_norm(x, s, b, **attrs)
    np.testing.assert_allclose(var, want_var, rtol=1e-4)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5 + stats_atol(x, s, 1))


def test_odd_sizes_scalar_tail():
    from bnexport_plugins.fused_norm.gpu_runtime import run_numpy

    for shape in [(1, 3), (3, 5, 7), (2, 3, 1, 1), (5, 1)]:
        for dtype in DTYPES:
            x, s, b = _inputs(shape, 1, dtype)
            _assert_close(
                run_numpy(x, s, b, activation="relu"), fused_norm(x, s, b, activation="relu"), dtype
            )


def test_image_matches_driver():
    """cubin under a driver of NVRTC's major or newer, else PTX lowered to the driver's ISA."""
    import re

    from bnexport_plugins.fused_norm.gpu_runtime import default_runtime
    from bnexport_plugins.fused_norm.nvrtc_build import ptx_isa_for_driver

    rt = default_runtime()
    if rt.driver_version // 1000 >= rt.kernels.nvrtc_version[0] and rt.kernels.kind == "cubin":
        assert rt.kernels.image[:4] == b"\x7fELF"
    else:
        assert rt.kernels.kind == "ptx"
        m = re.search(rb"^\.version (\d+)\.(\d+)$", rt.kernels.image, re.M)
        isa = tuple(int(v) for v in ptx_isa_for_driver(rt.driver_version).split("."))
        assert (int(m.group(1)), int(m.group(2))) <= max(isa, (7, 8))
