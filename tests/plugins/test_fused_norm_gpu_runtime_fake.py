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

from bnexport.runtime import cuda_api


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
