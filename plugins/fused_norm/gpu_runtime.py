"""Run the FusedNorm kernels on a CUDA GPU with cuda-bindings' driver API.

:class:`FusedNormCuda` compiles (NVRTC, cached) the kernels for the current device,
loads them with ``cuModuleLoadData`` and launches the :mod:`launch` plan on raw
device pointers; :func:`run_numpy` is the host-array convenience the GPU tests
and the benchmark use. The image is a cubin when the driver's CUDA major is at
least NVRTC's, else PTX whose ISA is lowered to what ``cuDriverGetVersion`` says
the driver accepts (:func:`nvrtc_build.ptx_isa_for_driver`); a GPU newer than
NVRTC also gets PTX. CUDA is reached through :mod:`bnexport.cuda_api`
only when used, so this module imports on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bnexport_plugins.fused_norm import spec
from bnexport_plugins.fused_norm.checks import check_inputs, dtype_name
from bnexport_plugins.fused_norm.launch import Plan, plan
from bnexport_plugins.fused_norm.nvrtc_build import (
    compile_kernels,
    image_kind_for_driver,
    nvrtc_version,
    ptx_isa_for_driver,
)

from bnexport.cuda_api import check, driver_version, handle_value
from bnexport.cuda_api import driver as _driver
from bnexport.errors import BackendUnavailableError

__all__ = [
    "FusedNormCuda",
    "PreparedLaunch",
    "check",
    "current_device_runtime",
    "default_runtime",
    "gpu_available",
    "gpu_unavailable_reason",
    "run_numpy",
    "runtime_for_device",
]


def gpu_unavailable_reason() -> str | None:
    """Why the FusedNorm kernels cannot run here (``None`` when a CUDA device is usable).

    Missing cuda-bindings, no driver, no device, or an NVRTC that cannot be loaded
    (e.g. another CUDA major) are reasons; any other exception is a bug and propagates.
    """
    try:
        drv = _driver()
        check(drv.cuInit(0), "cuInit")
        if check(drv.cuDeviceGetCount(), "cuDeviceGetCount") < 1:
            return "no CUDA device"
        nvrtc_version()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def gpu_available() -> bool:
    """True when a CUDA device and a loadable NVRTC are present (:func:`gpu_unavailable_reason`)."""
    return gpu_unavailable_reason() is None


@dataclass
class PreparedLaunch:
    """The launches of one plan with every kernel argument built once.

    Calling it enqueues the kernels with one ``cuLaunchKernel`` each and no other
    Python work, so back-to-back calls (or a CUDA graph captured from them) time the
    kernels, not the host code that builds their arguments.

    Attributes:
        calls: ``(CUfunction, grid, block, kernelParams address)`` per launch.
        stream: the ``CUstream`` they are enqueued on.
        keep: the argument arrays the ``kernelParams`` addresses point into (kept alive).
    """

    calls: list[tuple[Any, tuple[int, int, int], tuple[int, int, int], int]]
    stream: Any
    keep: list[np.ndarray] = field(default_factory=list, repr=False)

    def __call__(self, stream: Any = None) -> None:
        """Enqueue every launch (raises ``BackendUnavailableError`` on a CUDA error).

        Args:
            stream: another stream for this call (a ``CUstream`` or its integer value,
                e.g. torch's capture stream); default: the stream given to ``prepare``.
        """
        drv = _driver()
        if stream is None:
            stream = self.stream
        elif not isinstance(stream, drv.CUstream):
            stream = drv.CUstream(stream)
        launch = drv.cuLaunchKernel
        for function, grid, block, params in self.calls:
            err = launch(function, *grid, *block, 0, stream, params, 0)[0]
            if int(err):
                check((err,), "cuLaunchKernel")


class FusedNormCuda:
    """The FusedNorm kernels loaded on one device (primary context made current).

    Args:
        device: CUDA device ordinal.
    """

    def __init__(self, device: int = 0):
        drv = _driver()
        check(drv.cuInit(0), "cuInit")
        self.device = check(drv.cuDeviceGet(device), "cuDeviceGet")
        self.context = check(drv.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        check(drv.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        attr = drv.CUdevice_attribute
        major = check(
            drv.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device
            ),
            "attr",
        )
        minor = check(
            drv.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device
            ),
            "attr",
        )
        self.num_sms = check(
            drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.device),
            "attr",
        )
        self.arch = f"sm_{major}{minor}"
        self.name = (
            check(drv.cuDeviceGetName(256, self.device), "cuDeviceGetName").split(b"\0")[0].decode()
        )
        self.driver_version = driver_version()
        # cubin when the driver's major >= NVRTC's (or PTX for a GPU newer than NVRTC);
        # PTX otherwise, its ISA lowered to what this driver accepts
        self.kernels = compile_kernels(
            self.arch,
            kind=image_kind_for_driver(self.driver_version, nvrtc_version()),
            ptx_isa=ptx_isa_for_driver(self.driver_version),
        )
        # NUL-terminated copy kept alive for the driver (PTX must be a C string; harmless for ELF)
        self._image = np.frombuffer(self.kernels.image + b"\0", dtype=np.uint8)
        self.module = check(drv.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData")
        self._functions: dict[str, Any] = {}

    def function(self, name: str) -> Any:
        """The ``CUfunction`` of kernel ``name``."""
        if name not in self._functions:
            drv = _driver()
            self._functions[name] = check(
                drv.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({name})"
            )
        return self._functions[name]

    def prepare(self, p: Plan, buffers: dict[str, int], stream: Any = 0) -> PreparedLaunch:
        """Build the kernel arguments of ``p`` once; the result enqueues them when called.

        Args:
            p: From :func:`launch.plan`.
            buffers: Device pointer of each buffer the plan names (``x``, ``scale``,
                ``shift``, ``y``, and ``mean``/``var``/``ws`` where used).
            stream: ``CUstream`` handle or its integer value (0 = legacy default stream).
        """
        drv = _driver()
        keep: list[np.ndarray] = []
        calls = []
        for launch in p.launches:
            values = []
            for arg in launch.args:
                if arg.kind == "ptr":
                    values.append(
                        np.array([handle_value(buffers[arg.value]) + arg.offset], np.uint64)
                    )
                elif arg.kind == "null":
                    values.append(np.array([0], np.uint64))
                else:
                    values.append(np.array([arg.value], np.int32))
            addresses = np.array([v.ctypes.data for v in values], np.uint64)
            keep += [*values, addresses]
            calls.append(
                (self.function(launch.kernel), launch.grid, launch.block, addresses.ctypes.data)
            )
        handle = stream if isinstance(stream, drv.CUstream) else drv.CUstream(stream)
        return PreparedLaunch(calls, handle, keep)

    def launch(self, p: Plan, buffers: dict[str, int], stream: Any = 0) -> None:
        """Enqueue every launch of ``p`` on ``stream`` (:meth:`prepare`, then call it)."""
        self.prepare(p, buffers, stream)()

    # ------------------------------------------------------------ device memory helpers
    def alloc(self, nbytes: int) -> int:
        """``cuMemAlloc`` (at least 1 byte); returns the device pointer as an int."""
        return handle_value(check(_driver().cuMemAlloc(max(int(nbytes), 1)), "cuMemAlloc"))

    def free(self, ptr: int) -> None:
        """``cuMemFree``."""
        check(_driver().cuMemFree(ptr), "cuMemFree")

    def upload(self, host: np.ndarray) -> int:
        """Copy a host array to new device memory; returns the pointer."""
        host = np.ascontiguousarray(host)
        ptr = self.alloc(host.nbytes)
        if host.nbytes:
            check(
                _driver().cuMemcpyHtoD(ptr, host.ctypes.data, host.nbytes),
                "cuMemcpyHtoD",
            )
        return ptr

    def copy_in(self, ptr: int, host: np.ndarray) -> None:
        """Copy a host array into existing device memory at ``ptr``."""
        host = np.ascontiguousarray(host)
        if host.nbytes:
            src = host.ctypes.data
            check(_driver().cuMemcpyHtoD(ptr, src, host.nbytes), "cuMemcpyHtoD")

    def download(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Copy device memory into a new host array."""
        out = np.empty(shape, dtype)
        if out.nbytes:
            check(
                _driver().cuMemcpyDtoH(out.ctypes.data, ptr, out.nbytes),
                "cuMemcpyDtoH",
            )
        return out

    def synchronize(self) -> None:
        """``cuCtxSynchronize``."""
        check(_driver().cuCtxSynchronize(), "cuCtxSynchronize")


_RUNTIMES: dict[int, FusedNormCuda] = {}


def runtime_for_device(device: int) -> FusedNormCuda:
    """A process-wide :class:`FusedNormCuda` for CUDA device ``device`` (loaded once)."""
    device = int(device)
    if device not in _RUNTIMES:
        _RUNTIMES[device] = FusedNormCuda(device)
    return _RUNTIMES[device]


def default_runtime() -> FusedNormCuda:
    """A process-wide :class:`FusedNormCuda` on device 0."""
    return runtime_for_device(0)


def current_device_runtime() -> FusedNormCuda:
    """The kernels on the calling thread's current CUDA device (``cudaGetDevice``).

    A TensorRT engine enqueues on the device it was deserialized on; its plugin must
    launch there too, not on device 0 (pointers of one device are invalid on another).
    """
    from bnexport.cuda_api import runtime

    device: int = check(runtime().cudaGetDevice(), "cudaGetDevice")
    return runtime_for_device(int(device))


def run_numpy(
    x: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    strategy: str = "split",
    runtime: FusedNormCuda | None = None,
    x_byte_offset: int = 0,
    **attrs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run FusedNorm on the GPU for host arrays; same signature and results as the reference.

    Args:
        x: Input, as for :func:`reference.fused_norm`.
        scale: ``[C]`` parameters.
        shift: ``[C]`` parameters.
        strategy: ``"split"`` or ``"fused"`` (batch_stats).
        runtime: Loaded kernels (default: :func:`default_runtime`); anything with the same
            methods (``alloc``, ``free``, ``upload``, ``copy_in``, ``download``, ``launch``,
            ``synchronize``, ``num_sms``) works, e.g. the tests' CPU emulation.
        x_byte_offset: Place X and Y this many bytes past an aligned allocation (tests the
            unaligned scalar path).
        **attrs: FusedNorm attributes (defaults from ``spec.ATTRIBUTE_DEFAULTS``).
    """
    rt = runtime or default_runtime()
    full = {**spec.ATTRIBUTE_DEFAULTS, **attrs}
    full.pop("plugin_namespace", None)
    if int(full["axis"]) < 0:
        full["axis"] = int(full["axis"]) + x.ndim
    geo = check_inputs(x.shape, x.dtype, scale.shape, shift.shape, full)
    full = spec.validate_attributes(full)
    dtype = dtype_name(x.dtype)
    p = plan(geo, dtype, full, rt.num_sms, strategy)
    xs = np.ascontiguousarray(x)
    x_base = rt.alloc(xs.nbytes + x_byte_offset)
    y_base = rt.alloc(xs.nbytes + x_byte_offset)
    x_ptr, y_ptr = x_base + x_byte_offset, y_base + x_byte_offset
    rt.copy_in(x_ptr, xs)
    bufs = {
        "x": x_ptr,
        "y": y_ptr,
        "scale": rt.upload(scale.astype(np.float32)),
        "shift": rt.upload(shift.astype(np.float32)),
        "ws": rt.alloc(p.workspace_bytes),
        "mean": rt.alloc(4 * geo.groups * geo.channels),
        "var": rt.alloc(4 * geo.groups * geo.channels),
    }
    try:
        if geo.numel:
            rt.launch(p, bufs)
        rt.synchronize()
        y = rt.download(y_ptr, x.shape, x.dtype)
        if not full["return_stats"]:
            return y
        sshape = (geo.channels,) if full["virtual_batch_size"] == 0 else (geo.groups, geo.channels)
        return (
            y,
            rt.download(bufs["mean"], sshape, np.float32),
            rt.download(bufs["var"], sshape, np.float32),
        )
    finally:
        for name, ptr in bufs.items():
            rt.free(ptr - x_byte_offset if name in ("x", "y") else ptr)
