"""FusedNormCuda's start-up against a fake driver: which image a driver version gets.

No GPU here, so the driver API is a stand-in that reports an sm_90 device and a chosen
CUDA driver version, and records the image handed to ``cuModuleLoadData``; NVRTC is real.
"""

from __future__ import annotations

import ctypes
import re
import types

import pytest
from bnexport_plugins.fused_norm import gpu_runtime
from bnexport_plugins.fused_norm import nvrtc_build as nb

from bnexport import cuda_api


def _fake_driver(version: int, loaded: list[bytes]) -> types.SimpleNamespace:
    attrs = types.SimpleNamespace(
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor",
        CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT="sms",
    )
    values = {"major": 9, "minor": 0, "sms": 132}

    def load(ptr):
        loaded.append(ctypes.string_at(ptr))  # NUL-terminated image, as the driver reads it
        return 0, "module"

    return types.SimpleNamespace(
        CUdevice_attribute=attrs,
        cuInit=lambda flags: (0,),
        cuDeviceGet=lambda i: (0, i),
        cuDevicePrimaryCtxRetain=lambda dev: (0, "ctx"),
        cuCtxSetCurrent=lambda ctx: (0,),
        cuDeviceGetAttribute=lambda attr, dev: (0, values[attr]),
        cuDeviceGetName=lambda n, dev: (0, b"Fake H200\0\0"),
        cuDriverGetVersion=lambda: (0, version),
        cuModuleLoadData=load,
    )


@pytest.mark.parametrize("version", [12080, 13000])
def test_image_for_driver(kernel_cache, monkeypatch, version):
    loaded: list[bytes] = []
    monkeypatch.setitem(cuda_api._LOADED, "driver", _fake_driver(version, loaded))
    rt = gpu_runtime.FusedNormCuda(0)
    assert (rt.arch, rt.num_sms, rt.name, rt.driver_version) == ("sm_90", 132, "Fake H200", version)
    (image,) = loaded
    if version // 1000 >= nb.nvrtc_version()[0]:
        assert rt.kernels.kind == "cubin" and image[:4] == b"\x7fELF"
    else:  # a driver of an older CUDA major: PTX at the newest ISA it accepts
        isa = nb.ptx_isa_for_driver(version)
        assert rt.kernels.kind == "ptx" and rt.kernels.arch == "compute_90"
        assert re.search(rb"^\.version " + isa.encode() + rb"$", image, re.M)
        assert set(nb.ptx_entries(image)) == set(nb.all_entry_names())


def test_prepare_builds_kernel_arguments_once(monkeypatch):
    """prepare() builds every argument array once; each call is cuLaunchKernel only."""
    import numpy as np
    from bnexport_plugins.fused_norm import spec
    from bnexport_plugins.fused_norm.checks import check_inputs
    from bnexport_plugins.fused_norm.launch import plan

    launched = []

    class CUstream:
        def __init__(self, value=0):
            self.value = value

    drv = types.SimpleNamespace(
        CUstream=CUstream,
        cuModuleGetFunction=lambda module, name: (0, name.decode()),
        cuLaunchKernel=lambda f, gx, gy, gz, bx, by, bz, shm, stream, params, extra: (
            launched.append((f, (gx, gy, gz), stream.value, params)),
            (0,),
        )[1],
    )
    monkeypatch.setitem(cuda_api._LOADED, "driver", drv)
    rt = object.__new__(gpu_runtime.FusedNormCuda)
    rt.module, rt._functions = "module", {}
    attrs = spec.validate_attributes({**spec.ATTRIBUTE_DEFAULTS, "mode": "batch_stats"})
    p = plan(check_inputs((4, 8, 6, 6), "float32", (8,), (8,), attrs), "float32", attrs, 4)
    bufs = {name: 0x1000 * (i + 1) for i, name in enumerate(("x", "y", "scale", "shift", "ws"))}
    prepared = rt.prepare(p, bufs, stream=7)
    prepared()
    prepared(9)  # another stream (e.g. torch's capture stream), same arguments
    assert len(launched) == 2 * len(p.launches) == 6
    first, second = launched[:3], launched[3:]
    assert [c[3] for c in first] == [c[3] for c in second]  # the same argument arrays
    assert [c[2] for c in launched] == [7, 7, 7, 9, 9, 9]
    # the arguments behind kernelParams: pointers (u64) and int32 scalars, as planned
    for (kernel, grid, _, params), lnch in zip(first, p.launches, strict=True):
        assert kernel == lnch.kernel and grid == lnch.grid
        addresses = np.ctypeslib.as_array((ctypes.c_uint64 * len(lnch.args)).from_address(params))
        for address, arg in zip(addresses, lnch.args, strict=True):
            if arg.kind == "ptr":
                assert (
                    ctypes.c_uint64.from_address(int(address)).value == bufs[arg.value] + arg.offset
                )
            elif arg.kind == "i32":
                assert ctypes.c_int32.from_address(int(address)).value == arg.value
