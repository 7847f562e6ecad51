"""NVRTC compile of fused_norm.cu for sm_80 / sm_90 (no GPU needed), cache and PTX handling."""

from __future__ import annotations

import re

import pytest
from bnexport_plugins.fused_norm import nvrtc_build as nb


@pytest.mark.parametrize("arch", nb.DEFAULT_ARCHS)
def test_cubin_has_every_entry_point(compiled, arch):
    k = compiled(arch)
    assert k.kind == "cubin" and k.arch == arch and len(k.image) > 10_000
    assert k.image[:4] == b"\x7fELF"
    symbols = set(nb.cubin_symbols(k.image))
    missing = set(nb.all_entry_names()) - symbols
    assert not missing, f"entry points missing from the {arch} cubin: {sorted(missing)}"


def test_ptx_entries_and_isa_cap(compiled):
    k = compiled("compute_80", "ptx")
    assert k.arch == "compute_80" and k.image.lstrip().startswith(b"//")
    assert set(nb.ptx_entries(k.image)) == set(nb.all_entry_names())
    capped = nb.cap_ptx_isa(k.image, "7.0")
    assert re.search(rb"^\.version 7\.0$", capped, re.M)
    assert nb.cap_ptx_isa(k.image, "99.0") == k.image  # never raised
    sm90 = compiled("sm_90", "ptx").image
    assert re.search(rb"^\.version 7\.8$", nb.cap_ptx_isa(sm90, "7.0"), re.M)  # sm_90 needs 7.8


def test_disk_cache_hit_and_key(compiled, kernel_cache):
    first = compiled("sm_80")
    again = nb.compile_kernels("sm_80")
    assert again.cached and again.image == first.image
    files = list(kernel_cache.glob("fused_norm-sm_80-*.cubin"))
    assert len(files) == 1
    other = nb.compile_kernels("sm_80", options=("-lineinfo",), use_cache=False)
    assert not other.cached


def test_unknown_newer_arch_falls_back_to_ptx(kernel_cache):
    newest = max(nb.supported_archs())
    k = nb.compile_kernels(newest + 1000)
    assert k.kind == "ptx" and k.arch == f"compute_{newest}"


def test_entry_names():
    assert nb.entry_name("affine", "bfloat16") == "fused_norm_affine_bf16"
    with pytest.raises(ValueError):
        nb.entry_name("gemm", "float32")


# cuDriverGetVersion -> newest PTX ISA the driver loads (PTX ISA release history)
DRIVER_ISA = {
    10020: None, 11000: "7.0", 11080: "7.8", 12000: "8.0", 12040: "8.4", 12060: "8.5",
    12080: "8.7", 12090: "8.8", 13000: "9.0", 13010: "9.1",
}  # fmt: skip


@pytest.mark.parametrize("driver,isa", sorted(DRIVER_ISA.items()))
def test_ptx_isa_for_driver(driver, isa):
    assert nb.ptx_isa_for_driver(driver) == isa


def test_ptx_isa_for_driver_never_decreases():
    versions = [
        nb.ptx_isa_for_driver(1000 * major + 10 * minor)
        for major in range(11, 15)
        for minor in range(10)
    ]
    keys = [tuple(int(p) for p in v.split(".")) for v in versions]
    assert keys == sorted(keys) and keys[0] == (7, 0)


def test_image_kind_for_driver():
    assert nb.image_kind_for_driver(13000, (13, 5)) == "cubin"  # minor-version compatibility
    assert nb.image_kind_for_driver(14000, (13, 5)) == "cubin"
    assert nb.image_kind_for_driver(12090, (13, 0)) == "ptx"  # older major: PTX, JIT by driver


def _nvjitlink():
    from cuda.bindings import nvjitlink

    return nvjitlink


def _assemble(nvjitlink, ptx: bytes, arch: str) -> bytes:
    """PTX -> cubin with nvJitLink's ptxas (no GPU needed); raises with ptxas' log."""
    handle = nvjitlink.create(1, [f"-arch={arch}"])
    try:
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, ptx, len(ptx), "fused_norm.ptx")
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise AssertionError(f"ptxas refused the PTX: {bytes(log).decode()}") from exc
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin)
    finally:
        nvjitlink.destroy(handle)


# compute_80 at ISA 8.0 is what the TensorRT AOT plugin embeds; compute_90 what an H100/H200
# gets under an older driver (12.8) or the CUDA 13.0 driver of the lent machines
@pytest.mark.needs("nvjitlink", unverified="lowered PTX assembled by ptxas")
@pytest.mark.parametrize(
    "target,driver", [("compute_80", 12000), ("compute_90", 12080), ("compute_90", 13000)]
)
def test_lowered_ptx_assembles(kernel_cache, target, driver):
    """The PTX a driver of that CUDA version gets (ISA lowered) is valid PTX of that ISA.

    ptxas rejects a ``.version`` that does not cover an instruction or the target, so
    this checks that lowering the directive textually is sound for fused_norm.cu.
    """
    nvjitlink = _nvjitlink()
    isa = nb.ptx_isa_for_driver(driver)
    k = nb.compile_kernels(target, kind="ptx", ptx_isa=isa)
    want = max(tuple(map(int, isa.split("."))), nb.MIN_PTX_ISA[int(target[-2:])])
    assert re.search(rb"^\.version %d\.%d$" % want, k.image, re.M)
    cubin = _assemble(nvjitlink, k.image, "sm_" + target[-2:])
    assert set(nb.all_entry_names()) <= set(nb.cubin_symbols(cubin))


def test_nvrtc_that_cannot_load_is_backend_unavailable(monkeypatch):
    """An NVRTC of another CUDA major (or none) fails to load: BackendUnavailableError."""
    import sys
    import types

    from bnexport import cuda_api
    from bnexport.errors import BackendUnavailableError

    fake = types.ModuleType("cuda.bindings.nvrtc")

    def broken():
        raise RuntimeError("Failed to dlopen libnvrtc.so.13")

    fake.nvrtcVersion = broken
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", fake)
    monkeypatch.setattr(cuda_api, "_LOADED", {})
    nb.nvrtc_version.cache_clear()
    nb.supported_archs.cache_clear()
    try:
        with pytest.raises(BackendUnavailableError, match="libnvrtc.so.13"):
            nb.compile_kernels("sm_90", use_cache=False)
    finally:
        nb.nvrtc_version.cache_clear()
        nb.supported_archs.cache_clear()


@pytest.mark.parametrize("kind", ["cubin", "ptx"])
def test_compile_leaves_interpreter_bytes_intact(kind):
    """NVRTC writes into its output buffers; an empty log (size 1) once went into CPython's
    shared one-byte ``b" "`` object, after which ``b"a b".partition(b" ")`` no longer split
    anywhere in the process (it broke the server's Bearer-token parsing)."""
    nb.compile_kernels(nb.DEFAULT_ARCHS[-1], kind=kind, use_cache=False)
    space = bytes([32])
    assert b" " == space
    assert b"Bearer tok".partition(b" ") == (b"Bearer", space, b"tok")
