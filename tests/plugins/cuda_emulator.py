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


MIN_GCC = 12  # C++20 <barrier> and _Float16


def compiler() -> str | None:
    """g++ if present."""
    return shutil.which("g++")


def missing_compiler_reason() -> str | None:
    """Why the emulation cannot be built here: no g++, or one older than GCC 12; else None.

    Only the absence of a capable compiler is a reason to skip; once g++ >= 12 is there,
    a compile error (of fused_norm.cu or of the emulation header) fails the tests.
    """
    cxx = compiler()
    if cxx is None:
        return "g++ not found"
    version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True).stdout
    major = int(version.strip().split(".")[0] or 0)
    if major < MIN_GCC:
        return f"g++ {version.strip()} is older than {MIN_GCC} (needs C++20 <barrier>, _Float16)"
    return None


class EmulationBuildError(AssertionError):
    """g++ refused fused_norm.cu or the emulation: a real failure, never a skip."""


def build(out_dir: Path, source: Path | None = None) -> Path:
    """Compile the emulation library (cached by source hash) and return its path."""
    src_cu = source or Path(nvrtc_build.__file__).with_name(nvrtc_build.SOURCE_NAME)
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
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise EmulationBuildError(
                f"g++ could not compile {src_cu.name} for the CPU emulation "
                f"(exit {done.returncode}):\n{done.stderr[-6000:]}"
            )
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
