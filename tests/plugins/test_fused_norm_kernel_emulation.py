"""fused_norm.cu executed on the CPU (g++ emulation of threads, barriers and shuffles).

No GPU here, so this runs the real kernel source, launch plans and argument packing of
``gpu_runtime.run_numpy`` against the NumPy reference. It checks indexing, tiling,
vector/scalar paths, ghost batches and the Welford/Chan reductions; it cannot check
timing or the GPU memory model (see test_gpu_kernel.py for that).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from bnexport_plugins.fused_norm.gpu_runtime import run_numpy
from bnexport_plugins.fused_norm.reference import fused_norm
from cuda_emulator import EmulatedRuntime, EmulationBuildError, build
from kernel_cases import DTYPES, make_case, stats_atol

pytestmark = pytest.mark.needs("gxx12", unverified="the CPU emulation of the kernels")

# |y - ref| <= atol + rtol*|ref|: float32 math vs the float64 reference, one rounding to dtype
TOL = {"float32": (2e-6, 2e-6), "float16": (1e-3, 1e-3), "bfloat16": (8e-3, 8e-3)}


_case = functools.partial(make_case, offset=5.0)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    # a compile error raises EmulationBuildError (the test fails with g++'s messages)
    return EmulatedRuntime(build(tmp_path_factory.mktemp("emu")), num_sms=1)


def _compare(got, want, dtype, extra_atol=0.0):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    rtol, atol = TOL[dtype]
    atol += extra_atol
    assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
    np.testing.assert_allclose(
        got[0].astype(np.float64), want[0].astype(np.float64), rtol=rtol, atol=atol
    )
    for g, w in zip(got[1:], want[1:], strict=True):  # float32 moments vs float64 two-pass
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# (shape, axis): planar with vector path, planar with scalar path (inner % 8 != 0),
# channels-last, [N, C], channel axis in the middle
LAYOUTS = [
    ((2, 3, 8, 16), 1),
    ((2, 3, 5, 7), 1),
    ((4, 5, 3, 6), 3),
    ((12, 6), 1),
    ((4, 2, 3, 5), 2),
]


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_affine_emulated(rt, shape, axis, dtype, misaligned):
    x, s, b = _case(shape, axis, dtype)
    for act in ("silu", "leaky_relu", "relu6"):
        attrs = {"axis": axis, "activation": act, "alpha": 0.3}
        got = run_numpy(x, s, b, runtime=rt, x_byte_offset=x.itemsize if misaligned else 0, **attrs)
        _compare(got, fused_norm(x, s, b, **attrs), dtype)


# default run: every layout once per path (float32) and float16 on two layouts; the rest is slow
BATCH_CASES = [
    (layout, "float32", strategy) for layout in LAYOUTS for strategy in ("split", "fused")
]
BATCH_CASES += [(LAYOUTS[1], "float16", "split"), (LAYOUTS[2], "float16", "fused")]


@pytest.mark.parametrize("layout,dtype,strategy", BATCH_CASES)
def test_batch_stats_emulated(rt, layout, dtype, strategy):
    shape, axis = layout
    x, s, b = _case(shape, axis, dtype, offset=100.0)  # large mean: a naive variance fails
    for vbs in (0, 2):
        attrs = {
            "axis": axis,
            "mode": "batch_stats",
            "virtual_batch_size": vbs,
            "return_stats": 1,
            "activation": "relu",
        }
        got = run_numpy(x, s, b, runtime=rt, strategy=strategy, **attrs)
        _compare(got, fused_norm(x, s, b, **attrs), dtype, stats_atol(x, s, axis, vbs))


@pytest.mark.slow
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("strategy", ["split", "fused"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "shape,axis", [((4, 8, 16, 16), 1), ((8, 9, 7, 40), 3), ((64, 33), 1), ((8, 3, 40, 9), 2)]
)
def test_batch_stats_emulated_more(rt, shape, axis, dtype, strategy, misaligned):
    x, s, b = _case(shape, axis, dtype, seed=3, offset=-20.0)
    for vbs in (0, 4):
        attrs = {
            "axis": axis,
            "mode": "batch_stats",
            "virtual_batch_size": vbs,
            "return_stats": 1,
            "activation": "silu",
        }
        got = run_numpy(
            x,
            s,
            b,
            runtime=rt,
            strategy=strategy,
            x_byte_offset=x.itemsize if misaligned else 0,
            **attrs,
        )
        _compare(got, fused_norm(x, s, b, **attrs), dtype, stats_atol(x, s, axis, vbs))


def test_many_partials_chan_combine(rt):
    # num_sms=1 still gives several step-1 blocks per channel here; P > 1 is asserted
    from bnexport_plugins.fused_norm import spec
    from bnexport_plugins.fused_norm.checks import check_inputs
    from bnexport_plugins.fused_norm.launch import plan

    shape = (16, 1, 8, 128)
    attrs = spec.validate_attributes(
        {**spec.ATTRIBUTE_DEFAULTS, "mode": "batch_stats", "return_stats": 1}
    )
    p = plan(check_inputs(shape, "float32", (1,), (1,), attrs), "float32", attrs, num_sms=1)
    assert p.launches[0].grid[1] > 1
    x, s, b = _case(shape, 1, "float32", offset=1e3)
    _compare(
        run_numpy(x, s, b, runtime=rt, **attrs),
        fused_norm(x, s, b, **attrs),
        "float32",
        stats_atol(x, s, 1),
    )


def test_a_kernel_compile_error_fails_not_skips(tmp_path):
    """A broken fused_norm.cu must surface as a failure carrying g++'s message."""
    from pathlib import Path

    from bnexport_plugins.fused_norm import nvrtc_build

    good = Path(nvrtc_build.__file__).with_name(nvrtc_build.SOURCE_NAME).read_text()
    broken = tmp_path / "fused_norm.cu"
    broken.write_text(good + '\nextern "C" __global__ void oops() { undeclared_name = 1; }\n')
    with pytest.raises(EmulationBuildError, match="undeclared_name"):
        build(tmp_path, source=broken)
