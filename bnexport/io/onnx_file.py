"""Load an ONNX model from a user's file or bytes; every failure is one typed error naming the file.

What is refused, and why:

- a missing path (:class:`~bnexport.errors.FileMissingError`), a folder, an empty file;
- bytes protobuf cannot decode (corrupt, truncated, text, random), or that decode to a
  message with no IR version or graph (another protobuf, or random bytes that happen to
  parse) — :class:`~bnexport.errors.ModelFileError`;
- external data that is not a regular file inside the model's folder: an absolute
  ``location``, a ``..`` that escapes the folder, a symbolic link, a missing file. These
  are the rules of ``onnx.load`` and onnxruntime; they are checked here *before* any
  byte is read, also when the data is not loaded (``load_external_data=False``), and the
  message names the tensor and its ``location`` but never reads or shows what it points to.

:func:`onnxruntime_load_errors` does the same for ``onnxruntime.InferenceSession``
construction (unknown ops, invalid graphs, failed external-data checks), so
``bnexport.Session``, the server and the parity checker raise ``ModelFileError`` rather
than onnxruntime's pybind exceptions.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnexport.errors import BackendUnavailableError, FileMissingError, ModelFileError

#: onnxruntime pybind exception names that mean "this model cannot be loaded"
_ORT_MODEL_ERRORS = frozenset(
    {
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoModel",
        "NoSuchFile",
        "NotImplemented",
        "RuntimeException",
        "EngineError",
    }
)


def describe(source: Any) -> str:
    """How an error message names ``source`` (a path, bytes or a ModelProto)."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _check_header(model: Any, desc: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelFileError(
            f"{desc}: not an ONNX model (no IR version or graph: corrupt, truncated or "
            "another kind of file)"
        )


def _external_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of ``graph`` (initializers, attributes, subgraphs) kept externally."""
    import onnx

    def tensors_of(attr: Any) -> Iterator[Any]:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _external_tensors(attr.g)
        for sub in attr.graphs:
            yield from _external_tensors(sub)

    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for sparse in graph.sparse_initializer:
        for tensor in (sparse.values, sparse.indices):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor
    for node in graph.node:
        for attr in node.attribute:
            for tensor in tensors_of(attr):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    yield tensor


def check_external_data(model: Any, model_path: str | os.PathLike[str] | None) -> int:
    """Refuse external-data locations outside the model's folder; return how many tensors use it.

    Args:
        model: the ``onnx.ModelProto`` (external data not loaded).
        model_path: the file it was read from; ``None`` for bytes (then any external
            tensor is refused: there is no folder to read it from).

    Raises:
        ModelFileError: names the tensor and the offending ``location``.
    """
    count = 0
    desc = describe(model_path) if model_path is not None else "<in-memory model>"
    base = Path(os.path.realpath(Path(model_path).parent)) if model_path is not None else None
    for tensor in _external_tensors(model.graph):
        count += 1
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        where = f"{desc}: external data of tensor {tensor.name!r} (location {location!r})"
        if base is None:
            raise ModelFileError(f"{where}: a model given as bytes cannot use external data")
        if not location:
            raise ModelFileError(f"{where}: no location given")
        if os.path.isabs(location) or Path(location).drive:
            raise ModelFileError(f"{where}: absolute paths are refused")
        target = base / location
        if target.is_symlink():
            raise ModelFileError(f"{where}: symbolic links are refused")
        real = Path(os.path.realpath(target))
        if real != base and base not in real.parents:
            raise ModelFileError(f"{where}: points outside the model's folder")
        if not real.is_file():
            raise ModelFileError(f"{where}: no such file next to the model")
    return count


def load_onnx(source: Any, *, load_external_data: bool = True) -> Any:
    """Read an ``onnx.ModelProto`` from a path or serialized bytes (a ModelProto passes through).

    Args:
        source: path of an ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.
        load_external_data: also read tensors kept in external files (their
            locations are checked either way).

    Returns:
        The model.

    Raises:
        FileMissingError: the path does not exist.
        ModelFileError: a folder, an empty or undecodable file, no graph, or an
            external-data location outside the model's folder (see the module docstring).
    """
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(source, onnx.ModelProto):
        return source
    desc = describe(source)
    if isinstance(source, bytes | bytearray | memoryview):
        try:
            model = onnx.load_from_string(bytes(source))
        except DecodeError as exc:
            raise ModelFileError(f"{desc}: not an ONNX model (protobuf decode failed)") from exc
        _check_header(model, desc)
        check_external_data(model, None)
        return model
    if not isinstance(source, str | os.PathLike):
        raise ModelFileError(
            f"expected a path, bytes or an onnx.ModelProto. Received: {type(source).__name__}"
        )
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        raise ModelFileError(f"{desc}: is a folder, not an ONNX file")
    if not path.exists():
        raise FileMissingError(f"ONNX model not found: {desc} (no such file)")
    try:
        if path.stat().st_size == 0:
            raise ModelFileError(f"{desc}: not a readable ONNX model (the file is empty)")
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelFileError(
            f"{desc}: not a readable ONNX model (protobuf decode failed: corrupt, truncated "
            "or not ONNX)"
        ) from exc
    except OSError as exc:
        raise ModelFileError(f"{desc}: cannot read the file ({exc.strerror or exc})") from exc
    _check_header(model, desc)
    if check_external_data(model, path) and load_external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except (onnx.checker.ValidationError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{desc}: cannot load external data ({first})") from exc
    return model


def _clean_onnxruntime_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed: ?", "", text)
    text = text.replace("This is an invalid model. ", "")
    return text or type(exc).__name__


def translate_onnxruntime_error(exc: BaseException, desc: str) -> Exception | None:
    """The bnexport error for an onnxruntime session-creation failure, or ``None`` if not one."""
    kind = type(exc)
    if not kind.__module__.startswith("onnxruntime"):
        return None
    message = _clean_onnxruntime_message(exc)
    if kind.__name__ == "EPFail":
        return BackendUnavailableError(f"{desc}: onnxruntime execution provider failed: {message}")
    if kind.__name__ in _ORT_MODEL_ERRORS:
        return ModelFileError(f"{desc}: onnxruntime cannot load the model: {message}")
    return None


@contextlib.contextmanager
def onnxruntime_load_errors(desc: str) -> Iterator[None]:
    """Translate onnxruntime's load failures raised inside the block into ``ModelFileError``.

    Use around ``onnxruntime.InferenceSession(...)``; other exceptions pass unchanged.
    """
    try:
        yield
    except Exception as exc:
        translated = translate_onnxruntime_error(exc, desc)
        if translated is None:
            raise
        raise translated from exc


def check_graph_valid(model: Any, what: str, error: type[Exception]) -> None:
    """``onnx.checker`` (full check) on a graph this package produced.

    Skipped above protobuf's 2 GiB limit (the checker needs one serialized message).

    Raises:
        error: ``"<what> fails onnx.checker: <first line of the checker's message>"``.
    """
    import onnx

    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} fails onnx.checker: {first}") from exc
