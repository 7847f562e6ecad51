"""cuda_api: handle values without int(handle), error unwrapping, libraries that fail to load."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from cuda.bindings import driver, runtime

from bnexport import cuda_api
from bnexport.errors import BackendUnavailableError


@pytest.mark.parametrize(
    "handle,value",
    [
        (driver.CUdeviceptr(0x7F00_0000_1000), 0x7F00_0000_1000),
        (driver.CUdeviceptr(2**64 - 1), 2**64 - 1),
        (driver.CUstream(7), 7),
        (runtime.cudaStream_t(9), 9),
        (1234, 1234),
    ],
)
def test_handle_value(handle, value):
    assert cuda_api.handle_value(handle) == value


def test_handle_value_refuses_other_types():
    with pytest.raises(TypeError, match="float"):
        cuda_api.handle_value(1.5)


def test_check_unwraps_and_raises():
    assert cuda_api.check((0,), "x") is None
    assert cuda_api.check((0, 5), "x") == 5
    assert cuda_api.check((0, 5, 6), "x") == (5, 6)
    with pytest.raises(BackendUnavailableError, match="cuMemAlloc failed: 2"):
        cuda_api.check((2, None), "cuMemAlloc")


def test_driver_library_missing_is_backend_unavailable(monkeypatch):
    fake = types.ModuleType("cuda.bindings.driver")

    def missing():
        raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found ...')

    fake.cuDriverGetVersion = missing
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", fake)
    monkeypatch.setattr(cuda_api, "_LOADED", {})
    with pytest.raises(BackendUnavailableError, match="NVIDIA driver library"):
        cuda_api.driver_version()


def test_no_legacy_cuda_imports_or_int_of_handles():
    """cuda-bindings 13 removed ``from cuda import cudart``; int(handle) is deprecated."""
    root = Path(__file__).resolve().parents[2]
    sources = [*root.joinpath("plugins").rglob("*.py"), *root.joinpath("bnexport").rglob("*.py")]
    sources += [root / "benchmarks" / "kernel_bench.py"]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"^\s*from cuda import", text, re.M), path
        for call in ("int(ws)", "int(self._stream)", "int(check(", "int(_check_cuda("):
            assert call not in text, (path, call)


def test_gpu_modules_import_light():
    """Importing the GPU/TensorRT modules loads no TensorFlow, TensorRT or CUDA library."""
    import subprocess

    code = (
        "import sys\n"
        "import bnexport.cuda_api, bnexport.runtime.trt_build\n"
        "import bnexport.runtime.trt_backend, bnexport.serve.triton.repo\n"
        "import bnexport_plugins.fused_norm.gpu_runtime, bnexport_plugins.fused_norm.trt_plugin\n"
        "import bnexport_plugins.fused_norm.tensorrt_plugin, bnexport.runtime.cuda_api\n"
        "heavy = ('tensorflow', 'keras', 'tf2onnx', 'tensorrt', 'cuda.bindings.driver',\n"
        "         'cuda.bindings.runtime', 'cuda.bindings.nvrtc', 'torch')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_old_path_is_a_deprecated_alias():
    """``bnexport.runtime.cuda_api`` (README, one release): the same objects, with a warning."""
    import bnexport.runtime.cuda_api as old

    with pytest.warns(DeprecationWarning, match=r"import check from bnexport\.cuda_api"):
        assert old.check is cuda_api.check
    with pytest.warns(DeprecationWarning):
        from bnexport.runtime.cuda_api import handle_value
    assert handle_value is cuda_api.handle_value
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018
