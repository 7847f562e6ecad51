"""Deprecated path of :mod:`bnexport.cuda_api` (kept for one release).

The CUDA access module moved below both the runtime and the FusedNorm plugin, which
both use it. Every name read from here still works and emits a ``DeprecationWarning``
naming the new path.
"""

from __future__ import annotations

import warnings
from typing import Any

from bnexport import cuda_api as _cuda_api


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_cuda_api, name)  # AttributeError for a name that never existed
    warnings.warn(
        f"bnexport.runtime.cuda_api is deprecated; import {name} from bnexport.cuda_api",
        DeprecationWarning,
        stacklevel=2,
    )
    return value


def __dir__() -> list[str]:
    return [n for n in dir(_cuda_api) if not n.startswith("__")]
