"""Keras → ONNX export with batch-norm folding (``bnexport.export``).

The package name and the public function share the name ``export``: once any submodule
(``bnexport.export.report``, ...) is imported, Python binds the attribute
``bnexport.export`` to this *package*, shadowing the lazily imported function. So the
package itself is callable and forwards to the public function,
:func:`bnexport.compose.export` (the exporter, then ``int8=`` quantization), through the
facade's table of public names (``bnexport._resolve``); this package never imports
the quantizer. ``bnexport.export(model, "model.onnx")`` works either way.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """Module type whose call is the public ``bnexport.export`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from bnexport import _resolve

        return _resolve("export")(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
