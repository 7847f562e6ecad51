"""A CPU stand-in for :class:`gpu_runtime.FusedNormCuda` that runs ``fused_norm.cu`` itself.

The kernel source is compiled with g++ against ``cuda_host_emulation.hpp`` (CUDA threads as
std::threads, ``__syncthreads`` as a barrier, warp shuffles through a buffer, 16-bit
conversions in software) and loaded with ctypes. Device pointers are host addresses, so
:func:`gpu_runtime.run_numpy` drives it unchanged: plan, argument packing and kernels are
the real ones; only the hardware is emulated (no timing, no memory-model effects).
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
from bnexport_plugins.fused_norm import nvrtc_build

HERE = Path(__file__).resolve().parent


def compiler() -> str | None:
    """g++ if present (needs C++20 <barrier> and _Float16: GCC >= 12)."""
    return shutil.which("g++")


def build(out_dir: Path) -> Path:
    """Compile the emulation library (cached by source hash) and return its path."""
    src_cu = Path(nvrtc_build.__file__).with_name(nvrtc_build.SOURCE_NAME)
    names = nvrtc_build.all_entry_names()
    lines = [f'#include "{HERE / "cuda_host_emulation.hpp"}"', f'#include "{src_cu}"', ""]
    for n in names:
        lines.append(f"static void emu_{n}(void** a) {{ emu::call(&{n}, a); }}")
    lines.append(
        'extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,'
    )
    lines.append("                          unsigned bx, unsigned by, unsigned bz, void** args) {")
    lines.append("  void (*f)(void**) = nullptr;")
    for n in names:
        lines.append(f'  if (!std::strcmp(name, "{n}")) f = &emu_{n};')
    lines.append("  if (!f) return -1;")
    lines.append("  emu::launch([&] { f(args); }, dim3{gx, gy, gz}, dim3{bx, by, bz});")
    lines.append("  return 0;")
    lines.append("}")
    code = "\n".join(lines) + "\n"
    key = hashlib.sha256(
        code.encode() + src_cu.read_bytes() + (HERE / "cuda_host_emulation.hpp").read_bytes()
    )
    lib = out_dir / f"fused_norm_emu_{key.hexdigest()[:16]}.so"
    if not lib.exists():
        cpp = out_dir / "fused_norm_emu.cpp"
        cpp.write_text(code)
        flags = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC"]
        cmd = [compiler() or "g++", *flags, "-x", "c++", str(cpp), "-o", str(lib)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


class EmulatedRuntime:
    """Same methods as ``FusedNormCuda`` that ``run_numpy`` uses; memory is host memory."""

    def __init__(self, lib_path: Path, num_sms: int = 2):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.num_sms = num_sms
        self._buffers: dict[int, np.ndarray] = {}

    def alloc(self, nbytes: int) -> int:
        buf = np.zeros(max(int(nbytes), 1) + 256, np.uint8)
        ptr = (buf.ctypes.data + 255) // 256 * 256  # cudaMalloc-like alignment
        self._buffers[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        del self._buffers[ptr]

    def upload(self, host: np.ndarray) -> int:
        host = np.ascontiguousarray(host)
        ptr = self.alloc(host.nbytes)
        self.copy_in(ptr, host)
        return ptr

    def copy_in(self, ptr: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        ctypes.memmove(ptr, host.ctypes.data, host.nbytes)

    def download(self, ptr: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)
        return out

    def synchronize(self) -> None:
        pass

    def launch(self, p, buffers: dict[str, int], stream: int = 0) -> None:
        for lnch in p.launches:
            values = []
            for arg in lnch.args:
                if arg.kind == "ptr":
                    values.append(ctypes.c_uint64(int(buffers[arg.value]) + arg.offset))
                elif arg.kind == "null":
                    values.append(ctypes.c_uint64(0))
                else:
                    values.append(ctypes.c_int32(arg.value))
            argv = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            rc = self.lib.emu_launch(lnch.kernel.encode(), *lnch.grid, *lnch.block, argv)
            assert rc == 0, f"unknown kernel {lnch.kernel}"
