"""Load what the user asked to export into one shape: a :class:`LoadedModel`.

Accepted: an in-memory Keras 3 model, a ``.keras`` file, a tf.keras (``tf_keras``
package) model or ``.h5`` file, or a SavedModel directory. A SavedModel written by
tf.keras (it has ``keras_metadata.pb``) is loaded as a tf.keras model, so its
layers are known; any other SavedModel is exported from its serving signature and
its ``FusedBatchNorm*`` ops are folded on the ONNX side.

Safety — loading never runs the file's Python code unless asked to
------------------------------------------------------------------
:func:`load_model` is the one place bnexport loads a model file (export, parity,
recalibration helpers, the Python API, the quickstart). With ``safe_mode=True`` (the
default) a file that needs Python code to load — a ``Lambda`` layer holding a
marshalled ``lambda`` — is refused with :class:`~bnexport.errors.UnsafeModelError`
naming the layer(s) and the opt-in, before any of that code can run:

* ``.keras``: Keras 3's own ``safe_mode``;
* ``.h5`` and tf.keras SavedModel folders: tf-keras's ``SafeModeScope`` (passing
  ``safe_mode=True`` to ``tf_keras.models.load_model`` does *not* cover the legacy
  ``.h5`` path, the scope does); Keras 3's scope when tf-keras is not installed.

A SavedModel folder without Keras metadata has no Python code to run: loading it
restores its TensorFlow graph and variables, and exporting runs that graph (TF ops
only). ``safe_mode=False`` (``--unsafe-load`` on the command line) loads Lambda code —
only for files you trust.

Backends — a ``.keras`` file loads on the Keras backend in use
--------------------------------------------------------------
Keras 3 models and ``.keras`` files load on whatever backend Keras runs (TensorFlow, JAX,
torch) and nothing here imports TensorFlow for them: tf-keras (which imports TensorFlow)
is touched only for ``.h5`` files and SavedModel folders. bnexport's own training layers
(``bnexport.BatchNormalization``) are TensorFlow code: a ``.keras`` file that uses them is
loaded with them on the TensorFlow backend and refused, naming the layers, on the others.
A SavedModel always needs TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnexport.errors import BackendUnavailableError, ExportError, UnsafeModelError

#: what was loaded
KIND_KERAS = "keras"
KIND_TF_KERAS = "tf_keras"
KIND_SAVED_MODEL = "saved_model"


@dataclasses.dataclass
class TensorInfo:
    """A model input or output: ONNX-safe name, shape (``None`` = unknown), TF dtype name."""

    name: str
    shape: list[int | None]
    dtype: str


@dataclasses.dataclass
class LoadedModel:
    """A model ready for tracing.

    Attributes:
        kind: ``"keras"``, ``"tf_keras"`` or ``"saved_model"``.
        model: the Keras model, or the SavedModel's concrete serving function.
        inputs: the model inputs, in call order.
        outputs: the model outputs, in order.
        signature_keys: SavedModel only: the signature's input keyword per input.
        output_keys: SavedModel only: the signature's output key per output.
    """

    kind: str
    model: Any
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    signature_keys: list[str] = dataclasses.field(default_factory=list)
    output_keys: list[str] = dataclasses.field(default_factory=list)

    @property
    def is_keras(self) -> bool:
        """Whether layers are available (Keras 3 or tf.keras)."""
        return self.kind in (KIND_KERAS, KIND_TF_KERAS)


def safe_name(name: str) -> str:
    """An ONNX/TF-safe tensor name: ``[A-Za-z0-9_.-]``, ``:0`` suffixes dropped."""
    name = re.sub(r":\d+$", "", str(name))
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return name or "tensor"


def _dedupe(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        candidate, k = name, 1
        while candidate in out:
            candidate = f"{name}_{k}"
            k += 1
        out.append(candidate)
    return out


def _is_tf_keras_model(model: Any) -> bool:
    return type(model).__module__.startswith(("tf_keras", "keras.src.legacy", "tensorflow.python"))


def keras_backend() -> str | None:
    """The Keras 3 backend in use (``"tensorflow"``, ``"jax"``, ``"torch"``, ...), or None.

    Imports Keras (not TensorFlow, unless Keras itself runs on it); None when Keras 3 is
    not installed.
    """
    try:
        import keras
    except ImportError:
        return None
    return str(keras.config.backend())


def _keras_custom_objects() -> dict[str, Any]:
    """Bnexport's Keras layers, so ``.keras`` files that use them load.

    Only on the TensorFlow backend: the layers are TensorFlow code, and importing them
    elsewhere would import TensorFlow for nothing (:func:`_refuse_tf_layers` names them).
    """
    if keras_backend() != "tensorflow":
        return {}
    try:
        from bnexport.layers import batch_normalization as bn_module
    except ImportError:
        return {}
    return {
        name: getattr(bn_module, name)
        for name in ("BatchNormalization", "SyncBatchNormalization")
        if hasattr(bn_module, name)
    }


def _history_name(tensor: Any, fallback: str) -> str:
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None) or getattr(history, "layer", None)
    if layer is None and isinstance(history, tuple) and history:
        layer = history[0]
    return getattr(layer, "name", None) or getattr(tensor, "name", None) or fallback


def _keras_io(model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    try:
        inputs = list(model.inputs)
        outputs = list(model.outputs)
    except (AttributeError, ValueError) as exc:
        raise ExportError(
            f"model {model.name!r} is not built: give it an Input or call it on data first"
        ) from exc
    if not inputs:
        raise ExportError(
            f"model {model.name!r} is not built: give it an Input or call it on data first"
        )
    in_names = _dedupe([safe_name(_history_name(t, f"input_{i}")) for i, t in enumerate(inputs)])
    out_names = _dedupe([safe_name(_history_name(t, f"output_{i}")) for i, t in enumerate(outputs)])

    def info(tensor: Any, name: str) -> TensorInfo:
        dtype = getattr(tensor.dtype, "name", tensor.dtype)
        shape = [None if d is None else int(d) for d in tuple(tensor.shape)]
        return TensorInfo(name=name, shape=shape, dtype=str(dtype))

    return (
        [info(t, n) for t, n in zip(inputs, in_names, strict=True)],
        [info(t, n) for t, n in zip(outputs, out_names, strict=True)],
    )


def from_keras(model: Any) -> LoadedModel:
    """Wrap an in-memory Keras 3 or tf.keras model."""
    kind = KIND_TF_KERAS if _is_tf_keras_model(model) else KIND_KERAS
    inputs, outputs = _keras_io(model)
    return LoadedModel(kind=kind, model=model, inputs=inputs, outputs=outputs)


def _holds_code(layer_config: Any) -> bool:
    """Whether a ``Lambda`` layer's config holds a marshalled ``lambda`` (Python bytecode).

    tf.keras writes ``function_type: "lambda"``; Keras 3 a ``__lambda__`` function object.
    A ``Lambda`` wrapping a named, registered function holds only its name.
    """
    if not isinstance(layer_config, dict):
        return True
    if layer_config.get("function_type") == "lambda":
        return True
    function = layer_config.get("function")
    return isinstance(function, dict) and function.get("class_name") == "__lambda__"


def _lambda_layers(config: Any, *, code_only: bool = False) -> list[str]:
    """Names of the ``Lambda`` layers anywhere in a (JSON-decoded) model config.

    With ``code_only``, only those holding Python bytecode (:func:`_holds_code`).
    """
    found: list[str] = []
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            inner = config.get("config")
            if not code_only or _holds_code(inner):
                name = inner.get("name") if isinstance(inner, dict) else None
                found.append(str(name or config.get("name") or "?"))
        for value in config.values():
            found.extend(_lambda_layers(value, code_only=code_only))
    elif isinstance(config, list):
        for value in config:
            found.extend(_lambda_layers(value, code_only=code_only))
    return list(dict.fromkeys(found))


def _config_of(path: Path) -> Any:
    """The model config stored in ``path`` (``.keras``, ``.h5``, tf.keras SavedModel), or None.

    Read without deserializing anything (JSON only); used to name the layer that made
    safe mode refuse the file.
    """
    import json
    import zipfile

    try:
        if path.is_dir():
            meta = path / "keras_metadata.pb"
            if not meta.exists():
                return None
            from tf_keras.protobuf import saved_metadata_pb2

            proto = saved_metadata_pb2.SavedMetadata()
            proto.ParseFromString(meta.read_bytes())
            return [json.loads(node.metadata) for node in proto.nodes if node.metadata]
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
            if raw is None:
                return None
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except Exception:  # noqa: BLE001 - only used to improve a message
        return None


def _bnexport_layers(config: Any) -> list[str]:
    """Names of the layers of bnexport's own (TensorFlow-only) classes in a model config."""
    found: list[str] = []
    if isinstance(config, dict):
        if str(config.get("module") or "").startswith("bnexport.layers"):
            inner = config.get("config")
            name = inner.get("name") if isinstance(inner, dict) else None
            found.append(f"{name or '?'} ({config.get('class_name')})")
        for value in config.values():
            found.extend(_bnexport_layers(value))
    elif isinstance(config, list):
        for value in config:
            found.extend(_bnexport_layers(value))
    return list(dict.fromkeys(found))


def _refuse_tf_layers(path: Path, backend: str | None) -> None:
    """Refuse a ``.keras`` file with bnexport layers on a backend other than TensorFlow.

    Keras would otherwise import their module (and TensorFlow with it) or fail with
    "Could not locate class"; one line naming the layers and the way out is clearer.
    """
    if backend in (None, "tensorflow"):
        return
    layers = _bnexport_layers(_config_of(path))
    if layers:
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        raise BackendUnavailableError(
            f"{str(path)!r}: layer(s) {shown} are bnexport's training layers, which run on "
            f"the TensorFlow backend only (Keras backend here: {backend}); export this file "
            "with KERAS_BACKEND=tensorflow"
        )


def _is_safe_mode_refusal(exc: BaseException) -> bool:
    text = str(exc)
    return "safe_mode=False" in text or ("safe_mode" in text and "lambda" in text.lower())


def _unsafe(path: Path) -> UnsafeModelError:
    layers = _lambda_layers(_config_of(path))
    what = (
        f"Lambda layer(s) {', '.join(repr(n) for n in layers)}"
        if layers
        else "a layer that holds Python code"
    )
    return UnsafeModelError(
        f"{str(path)!r}: refused to load {what}: loading would run Python code stored in "
        "the file. If you trust it, pass safe_mode=False (Python) or --unsafe-load (CLI)"
    )


@contextlib.contextmanager
def _safe_mode_scopes(safe_mode: bool, *, legacy: bool = True) -> Iterator[None]:
    """Keras 3's and tf-keras's safe-mode scopes (whichever is installed), both set.

    ``legacy=False`` (a ``.keras`` file, which only Keras 3 reads) leaves tf-keras out:
    importing it imports TensorFlow.
    """
    with contextlib.ExitStack() as stack:
        try:
            from keras.src.saving.serialization_lib import SafeModeScope as KerasScope
        except ImportError:
            pass
        else:
            stack.enter_context(KerasScope(safe_mode))
        if legacy:
            try:
                from tf_keras.src.saving.serialization_lib import SafeModeScope as TfKerasScope
            except ImportError:
                pass
            else:
                stack.enter_context(TfKerasScope(safe_mode))
        yield


def _load_keras_file(path: Path, safe_mode: bool) -> Any:
    """Deserialize a ``.keras`` / ``.h5`` file or tf.keras SavedModel under safe mode.

    ``.keras`` goes to Keras 3 on its current backend; ``.h5`` and tf.keras SavedModels to
    tf-keras where it is installed and Keras runs on TensorFlow, else to Keras 3.
    """
    suffix = path.suffix.lower()
    backend = keras_backend()
    if suffix == ".keras":
        _refuse_tf_layers(path, backend)
    legacy = suffix != ".keras" and backend in (None, "tensorflow")
    try:
        with _safe_mode_scopes(safe_mode, legacy=legacy):
            if suffix == ".keras":
                import keras

                return keras.saving.load_model(
                    str(path),
                    custom_objects=_keras_custom_objects(),
                    compile=False,
                    safe_mode=safe_mode,
                )
            tf_keras = None
            if legacy:
                try:
                    import tf_keras
                except ImportError:
                    tf_keras = None
            if tf_keras is None:
                import keras

                return keras.saving.load_model(str(path), compile=False, safe_mode=safe_mode)
            return tf_keras.models.load_model(str(path), compile=False, safe_mode=safe_mode)
    except (ValueError, TypeError) as exc:
        if safe_mode and _is_safe_mode_refusal(exc):
            raise _unsafe(path) from None
        raise


def _load_saved_model(path: Path, safe_mode: bool = True) -> LoadedModel:
    if (path / "keras_metadata.pb").exists():
        try:
            import tf_keras  # noqa: F401
        except ImportError:
            pass
        else:
            # tf-keras's SavedModel loader answers a refused Lambda by silently reviving
            # the layer from its traced graph: a model that is not the one saved. Refuse
            # up front instead, like the .keras and .h5 paths do.
            if safe_mode and _lambda_layers(_config_of(path), code_only=True):
                raise _unsafe(path)
            return from_keras(_load_keras_file(path, safe_mode))
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    signatures = getattr(loaded, "signatures", {})
    if "serving_default" in signatures:
        fn = signatures["serving_default"]
    elif len(signatures) == 1:
        fn = next(iter(signatures.values()))
    else:
        raise ExportError(
            f"SavedModel {str(path)!r} has no 'serving_default' signature "
            f"(signatures: {sorted(signatures)})"
        )
    _, kwargs = fn.structured_input_signature
    keys = sorted(kwargs)
    inputs = [
        TensorInfo(
            name=safe_name(kwargs[k].name or k),
            shape=[None if d is None else int(d) for d in kwargs[k].shape],
            dtype=kwargs[k].dtype.name,
        )
        for k in keys
    ]
    out_keys = sorted(fn.structured_outputs)
    outputs = [
        TensorInfo(
            name=safe_name(k),
            shape=[None if d is None else int(d) for d in fn.structured_outputs[k].shape],
            dtype=fn.structured_outputs[k].dtype.name,
        )
        for k in out_keys
    ]
    # keep the loaded object alive with the function (its variables live there)
    fn._bnexport_owner = loaded  # noqa: SLF001
    return LoadedModel(
        kind=KIND_SAVED_MODEL,
        model=fn,
        inputs=inputs,
        outputs=outputs,
        signature_keys=keys,
        output_keys=out_keys,
    )


def load_model(source: Any, *, safe_mode: bool = True) -> LoadedModel:
    """Load ``source`` (a model object or a path) for export, parity or recalibration.

    Args:
        source: Keras 3 or tf.keras model, or a path to a ``.keras`` file, an
            ``.h5`` file, or a SavedModel directory.
        safe_mode: refuse a file whose loading would run Python code stored in it
            (a ``Lambda`` layer's ``lambda``); see the module doc. ``False`` only for
            files you trust. In-memory models are returned as they are.

    Raises:
        ExportError: the path does not exist or is not a supported format.
        UnsafeModelError: ``safe_mode=True`` and the file holds code (names the layer
            and the opt-in).
    """
    if not isinstance(source, str | os.PathLike):
        if hasattr(source, "layers") and hasattr(source, "inputs"):
            return from_keras(source)
        raise ExportError(
            f"cannot export a {type(source).__name__}: expected a Keras model, a .keras/.h5 "
            "file or a SavedModel directory"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise ExportError(f"model path {str(path)!r} does not exist")
    from bnexport.io.keras_file import check_keras_source, keras_load_errors

    check_keras_source(path)  # ModelFileError: empty, text, zip of garbage, not HDF5
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ExportError(f"{str(path)!r} is a directory without saved_model.pb")
        with keras_load_errors(path):  # what TF/Keras raise about a broken file
            return _load_saved_model(path, safe_mode)
    if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        with keras_load_errors(path):
            model = _load_keras_file(path, safe_mode)
        return from_keras(model)
    raise ExportError(
        f"unsupported model file {str(path)!r}: expected .keras, .h5 or a SavedModel directory"
    )
