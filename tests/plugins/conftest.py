"""Fixtures of the fused-norm plugin tests: one NVRTC compile per target per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    """A fresh kernel cache folder (BNEXPORT_CACHE_DIR) for the whole session."""
    path = tmp_path_factory.mktemp("kernel-cache")
    old = os.environ.get("BNEXPORT_CACHE_DIR")
    os.environ["BNEXPORT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BNEXPORT_CACHE_DIR", None)
    else:
        os.environ["BNEXPORT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def compiled(kernel_cache):
    """``compile(arch, kind)`` memoized for the session.

    NVRTC (cuda-bindings + nvidia-cuda-nvrtc, both in the ``test`` extra) needs no GPU, so
    a missing or unloadable NVRTC fails these tests instead of skipping them.
    """
    from bnexport_plugins.fused_norm.nvrtc_build import compile_kernels

    memo = {}

    def get(arch: str, kind: str = "cubin"):
        if (arch, kind) not in memo:
            memo[arch, kind] = compile_kernels(arch, kind=kind)
        return memo[arch, kind]

    return get
