"""The plugin package imports anywhere: no TensorFlow, tensorrt/cuda only when used."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "spec", "checks", "reference", "onnx_node", "ort_cpu", "lowering", "launch",
    "nvrtc_build", "gpu_runtime", "tensorrt_plugin", "trt_plugin",
]  # fmt: skip


def test_no_heavy_imports():
    code = (
        "import sys\n"
        + "".join(f"import bnexport_plugins.fused_norm.{m}\n" for m in MODULES)
        + "heavy = ('tensorflow', 'tensorrt', 'cuda.bindings.driver', 'torch')\n"
        + "heavy = [m for m in heavy if m in sys.modules]\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.needs_absent("tensorrt", why="checks the error without tensorrt")
def test_tensorrt_missing_is_a_clear_error():
    from bnexport_plugins.fused_norm.tensorrt_plugin import register_fused_norm_plugin

    from bnexport.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="tensorrt >= 10.9"):
        register_fused_norm_plugin()


def test_trt_plugin_path_is_deprecated_and_forwards():
    """``trt_plugin`` (README, one release): ``build_engine`` is the runtime builder's alias
    (tests/runtime/test_runtime_trt_fake.py); its other names are ``tensorrt_plugin``'s."""
    from bnexport_plugins.fused_norm import tensorrt_plugin, trt_plugin

    with pytest.warns(DeprecationWarning, match=r"fused_norm\.tensorrt_plugin\.Tactic"):
        assert trt_plugin.Tactic is tensorrt_plugin.Tactic
    with pytest.warns(DeprecationWarning):
        from bnexport_plugins.fused_norm.trt_plugin import register_fused_norm_plugin
    assert register_fused_norm_plugin is tensorrt_plugin.register_fused_norm_plugin
    assert not hasattr(tensorrt_plugin, "build_engine")  # one builder: bnexport.runtime.trt_build
