"""Which optional extra installs which module, for "X is not installed" messages.

``pip install bnexport`` is the inference side (numpy, onnx, onnx-ir, onnxruntime, rich);
everything else comes with an extra (see ``pyproject.toml``). A feature that needs a
missing module fails with one line naming the extra: the CLI through
:func:`missing_extra_message`, the lazy top-level attributes (``bnexport.BatchNormalization``)
with :class:`~bnexport.errors.MissingExtraError`, still an ``ImportError``.

The hint is written ``pip install "bnexport[extra]"``: double quotes work in POSIX shells,
PowerShell and cmd.exe alike (single quotes do not in cmd.exe), and the brackets must be
quoted for zsh. A message holding it must not go through rich markup unescaped: rich
reads ``[tensorrt]`` as a style tag and drops it (``pip install 'bnexport'``).
"""

from __future__ import annotations

from bnexport.errors import MissingExtraError

#: top-level module -> the extra that installs it
EXTRA_OF_MODULE = {
    "tensorflow": "keras",
    "keras": "keras",
    "tf2onnx": "keras",
    "sklearn": "keras",
    "matplotlib": "keras",
    "h5py": "keras",
    "tf_keras": "legacy",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "prometheus_client": "serve",
    "pydantic": "serve",
    "grpc": "serve",
    "tritonclient": "serve",
    "ray": "ray",
    "tensorrt": "tensorrt",
    "cuda": "gpu",
    "onnxruntime_extensions": "test",
}

#: top-level module -> the distribution that installs it, where the names differ
_DISTRIBUTION_OF_MODULE = {"google": "protobuf", "yaml": "pyyaml", "PIL": "pillow"}


def install_hint(extra: str) -> str:
    """``pip install "bnexport[extra]"`` (quoted for every shell)."""
    return f'pip install "bnexport[{extra}]"'


def _missing_and_hint(exc: ModuleNotFoundError) -> tuple[str, str] | None:
    missing = (exc.name or "").split(".")[0]
    if not missing or missing in ("bnexport", "bnexport_plugins"):
        return None  # a broken install or a bug, never a missing extra
    extra = EXTRA_OF_MODULE.get(missing)
    if extra:
        return missing, install_hint(extra)
    return missing, f"pip install {_DISTRIBUTION_OF_MODULE.get(missing, missing)}"


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """``'X is not installed (pip install "bnexport[extra]")'``, or ``None`` for our modules."""
    found = _missing_and_hint(exc)
    return None if found is None else f"{found[0]} is not installed ({found[1]})"


def missing_extra_error(exc: ModuleNotFoundError, feature: str) -> MissingExtraError | None:
    """``"<feature> needs X, which is not installed (pip install ...)"``, or ``None``."""
    found = _missing_and_hint(exc)
    if found is None:
        return None
    missing, hint = found
    return MissingExtraError(
        f"{feature} needs {missing}, which is not installed ({hint})", name=exc.name
    )
