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
