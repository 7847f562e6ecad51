"""cuda-bindings access for every GPU path: imports, error checks, handles, versions.

One home for what the TensorRT backend (:mod:`bnexport.runtime`), the FusedNorm kernels'
launcher and NVRTC build (:mod:`bnexport_plugins.fused_norm`) need from ``cuda-bindings``
(>= 12.6 layout ``cuda.bindings.*``; the old ``from cuda import cudart`` modules are gone
in 13 and are not used). It sits below both, like :mod:`bnexport.errors`: the runtime uses
the plugin, the plugin never imports the runtime.

* :func:`driver`, :func:`runtime`, :func:`nvrtc` import a binding module **and load
  its library** (one cheap call). cuda-bindings loads ``libcuda`` / ``libnvrtc``
  lazily, on the first call, and raises ``RuntimeError``/``OSError`` there when the
  library is missing or has another CUDA major (NVRTC 12 wheel under cuda-bindings 13,
  no NVIDIA driver). Probing at import time turns that into
  :class:`~bnexport.errors.BackendUnavailableError`, so GPU tests skip with a reason
  and callers see one line instead of an error from deep inside a kernel launch.
* :func:`check` unwraps the ``(err, *values)`` tuples the bindings return.
* :func:`handle_value` reads the address inside a ``CUdeviceptr``/``CUstream``/
  ``cudaStream_t`` without ``int(handle)`` (deprecated in cuda-bindings 13): the
  bindings' ``getPtr()`` returns the address *of* the C handle, whose 8 bytes are read.

Nothing here runs at import time; this module imports on machines without CUDA.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

from bnexport.errors import BackendUnavailableError

#: extra a missing binding is installed with
_INSTALL = 'pip install "bnexport[gpu]" (cuda-bindings and nvidia-cuda-nvrtc of one CUDA major)'

_LOADED: dict[str, Any] = {}


def _load(module: str, probe: str, what: str, hint: str) -> Any:
    """Import ``cuda.bindings.<module>`` and call ``probe()`` once so its library loads."""
    if module in _LOADED:
        return _LOADED[module]
    try:
        mod = importlib.import_module(f"cuda.bindings.{module}")
    except ImportError as exc:
        raise BackendUnavailableError(f"{what} needs cuda-bindings ({_INSTALL}): {exc}") from exc
    try:
        result = getattr(mod, probe)()
    except (RuntimeError, OSError) as exc:  # library missing, or built for another CUDA major
        raise BackendUnavailableError(
            f"{what}: cuda.bindings.{module} could not load its library ({exc}); {hint}"
        ) from exc
    check(result, f"{probe} ({what})")
    _LOADED[module] = mod
    return mod


def driver() -> Any:
    """``cuda.bindings.driver`` with ``libcuda`` loaded.

    Raises:
        BackendUnavailableError: cuda-bindings is missing or no NVIDIA driver is installed.
    """
    return _load(
        "driver", "cuDriverGetVersion", "the CUDA driver API", "is an NVIDIA driver installed?"
    )


def runtime() -> Any:
    """``cuda.bindings.runtime`` (the CUDA runtime API) with at least one device visible.

    Raises:
        BackendUnavailableError: cuda-bindings is missing, no NVIDIA driver is installed, or
            ``cudaGetDeviceCount`` fails (no GPU).
    """
    return _load(
        "runtime", "cudaGetDeviceCount", "the CUDA runtime API", "is an NVIDIA driver installed?"
    )


def nvrtc() -> Any:
    """``cuda.bindings.nvrtc`` with ``libnvrtc`` loaded.

    Raises:
        BackendUnavailableError: cuda-bindings or the NVRTC wheel is missing, or NVRTC's
            CUDA major differs from cuda-bindings' (e.g. ``nvidia-cuda-nvrtc`` 12 under
            cuda-bindings 13).
    """
    return _load(
        "nvrtc",
        "nvrtcVersion",
        "compiling the FusedNorm kernels (NVRTC)",
        f"install matching versions: {_INSTALL}",
    )


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-bindings ``(err, *values)`` result.

    Returns:
        ``None`` for no values, the value for one, else the tuple of values.

    Raises:
        BackendUnavailableError: ``err`` is not success (0); the message names ``what``.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA {what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def handle_value(handle: Any) -> int:
    """The integer inside a cuda-bindings handle (``CUdeviceptr``, ``CUstream``...) or an int.

    ``handle.getPtr()`` is the address of the C handle (``&ptr``), so the value is the
    64-bit word stored there; no ``int(handle)``, which cuda-bindings 13 deprecates.
    """
    if isinstance(handle, int):
        return handle
    get_ptr = getattr(handle, "getPtr", None)
    if get_ptr is None:
        raise TypeError(f"not a cuda-bindings handle or an int: {type(handle).__name__}")
    return int(ctypes.c_uint64.from_address(get_ptr()).value)


def driver_version() -> int:
    """``cuDriverGetVersion``: the CUDA version the driver supports, ``1000*major + 10*minor``.

    Raises:
        BackendUnavailableError: no driver (see :func:`driver`).
    """
    drv = driver()
    version: int = check(drv.cuDriverGetVersion(), "cuDriverGetVersion")
    return version
