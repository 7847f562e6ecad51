"""What this machine can do, for the one skip hook in ``tests/conftest.py``.

A test that needs something this machine may lack says so with a marker, and the
hook decides::

    @pytest.mark.needs("tensorrt", "cuda_gpu", unverified="engine build and run")
    def test_engine(): ...

    @pytest.mark.needs_absent("tensorrt", why="checks the error without TensorRT")
    def test_tensorrt_missing_is_reported(): ...

The skip reason is ``"needs tensorrt, cuda_gpu (<why each is missing>): engine build and
run not verified"``: it names what is missing and what stayed unchecked. Each probe runs
once per session and only when a collected test asks for it (the CUDA probe loads the
driver).
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import shutil
from collections.abc import Callable
from typing import Any

import pytest

X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
_CHROMIUMS = ("chromium", "chromium-browser", "google-chrome")


def _module(name: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        return None if found else f"{name} not installed"

    return probe


def _program(*names: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if any(shutil.which(n) for n in names) else f"no {' / '.join(names)} on PATH"

    return probe


def _cuda_gpu() -> str | None:
    from bnexport_plugins.fused_norm.gpu_runtime import gpu_unavailable_reason

    return gpu_unavailable_reason()


def _x86() -> str | None:
    machine = platform.machine().lower()
    return None if machine in X86_MACHINES else f"not an x86 CPU ({machine})"


def _gxx12() -> str | None:
    """g++ >= 12 for the CPU emulation of the CUDA kernels (``tests/plugins/cuda_emulator.py``)."""
    import sys
    from pathlib import Path

    module = sys.modules.get("cuda_emulator")
    if module is None:
        path = Path(__file__).resolve().parents[1] / "plugins" / "cuda_emulator.py"
        spec = importlib.util.spec_from_file_location("cuda_emulator", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["cuda_emulator"] = module
        spec.loader.exec_module(module)
    return module.missing_compiler_reason()


def _ray_serve() -> str | None:
    missing = _module("ray.serve")()
    return missing and "ray[serve] not installed (pip install 'bnexport[ray]')"


def _onnxruntime_gpu() -> str | None:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    return None if "CUDAExecutionProvider" in providers else "onnxruntime has no CUDA provider"


def _nvjitlink() -> str | None:
    try:
        from cuda.bindings import nvjitlink

        nvjitlink.version()
    except (ImportError, RuntimeError) as exc:  # the nvidia-nvjitlink wheel is not installed
        return f"nvidia-nvjitlink not loadable: {exc}"
    return None


def _proc_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8"):
            return None
    except OSError as exc:
        return f"no /proc/cpuinfo ({exc.strerror})"


#: capability -> probe returning why it is missing (``None``: present).
PROBES: dict[str, Callable[[], str | None]] = {
    "tensorrt": _module("tensorrt"),
    "cuda_gpu": _cuda_gpu,
    "ray_serve": _ray_serve,
    "curl": _program("curl"),
    "chromium": _program(*_CHROMIUMS),
    "gxx12": _gxx12,
    "x86": _x86,
    "onnxruntime_gpu": _onnxruntime_gpu,
    "nvjitlink": _nvjitlink,
    "proc_cpuinfo": _proc_cpuinfo,
}


@functools.cache
def missing(capability: str) -> str | None:
    """Why ``capability`` is missing on this machine, or ``None`` when it is present."""
    if capability not in PROBES:
        raise KeyError(f"unknown capability {capability!r}; known: {', '.join(sorted(PROBES))}")
    return PROBES[capability]()


def chromium_path() -> str | None:
    """The first Chromium-like browser on PATH."""
    return next(
        (shutil.which(n) for n in _CHROMIUMS if shutil.which(n)),
        None,
    )


def skip_reason(item: Any) -> str | None:
    """Why ``item`` must skip here, from its ``needs`` / ``needs_absent`` markers (``None``: run).

    ``needs("tensorrt", "cuda_gpu", unverified="...")``: skip naming what is missing and
    what stayed unverified (``unverified`` is required: a skip must say what it leaves
    unchecked). ``needs_absent("tensorrt", why="...")``: run only where the capability is
    absent (the error path for a missing extra).
    """
    for marker in item.iter_markers("needs"):
        if not marker.kwargs.get("unverified"):
            raise pytest.UsageError(f"{item.nodeid}: needs(...) without unverified=")
        absent = {name: missing(name) for name in marker.args}
        absent = {name: why for name, why in absent.items() if why}
        if absent:
            what = ", ".join(f"{name} ({why})" for name, why in absent.items())
            return f"needs {what}: {marker.kwargs['unverified']} not verified"
    for marker in item.iter_markers("needs_absent"):
        if not marker.kwargs.get("why"):
            raise pytest.UsageError(f"{item.nodeid}: needs_absent(...) without why=")
        present = [name for name in marker.args if missing(name) is None]
        if present:
            return f"{', '.join(present)} present; {marker.kwargs['why']}"
    return None
