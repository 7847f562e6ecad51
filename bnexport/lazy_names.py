"""Public names of a package imported on first use (PEP 562 ``__getattr__``/``__dir__``).

A package that re-exports names from heavy modules (FastAPI, onnxruntime, Ray,
TensorFlow) keeps ``import package`` light with a table ``{name: module}``::

    _LAZY = {"serve_model": "bnexport.serve.server"}
    __all__ = list(_LAZY)
    __getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

The first access imports the module and stores the value in the package, so later
accesses are plain attribute reads. A module that is missing because an optional
extra is not installed becomes a :class:`~bnexport.errors.MissingExtraError` naming
the extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any


def lazy_names(
    package: str,
    table: Mapping[str, str],
    namespace: MutableMapping[str, Any],
    *,
    public: Iterable[str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` over ``table``.

    Args:
        package: the package's ``__name__`` (for error messages).
        table: public name -> dotted module that defines it.
        namespace: the package's ``globals()``; a name is cached there once imported.
        public: what ``dir(package)`` lists (default: the names of ``table``).

    Returns:
        ``(__getattr__, __dir__)`` to assign at the package's module level.
    """
    listed = sorted(public if public is not None else table)

    def __getattr__(name: str) -> Any:
        value = import_name(package, table, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return list(listed)

    return __getattr__, __dir__


def import_name(package: str, table: Mapping[str, str], name: str) -> Any:
    """The value the public name ``package.name`` stands for, imported from its module.

    Raises:
        AttributeError: ``name`` is not in ``table``.
        MissingExtraError: the module needs an optional extra that is not installed (named).
    """
    module = table.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:  # an optional extra is not installed: name it
        from bnexport.extras import missing_extra_error

        error = missing_extra_error(exc, f"{package}.{name}")
        if error is None:
            raise
        raise error from exc
