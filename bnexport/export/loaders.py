"""Load what the user asked to export into one shape: a :class:`LoadedModel`.

Accepted: an in-memory Keras 3 model, a ``.keras`` file, a tf.keras (``tf_keras``
package) model or ``.h5`` file, or a SavedModel directory. A SavedModel written by
tf.keras (it has ``keras_metadata.pb``) is loaded as a tf.keras model, so its
layers are known; any other SavedModel is exported from its serving signature and
its ``FusedBatchNorm*`` ops are folded on the ONNX side.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from bnexport.errors import ExportError

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


def _keras_custom_objects() -> dict[str, Any]:
    """Bnexport's Keras layers, so ``.keras`` files that use them load."""
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


def _load_saved_model(path: Path) -> LoadedModel:
    if (path / "keras_metadata.pb").exists():
        try:
            import tf_keras
        except ImportError:
            pass
        else:
            return from_keras(tf_keras.models.load_model(str(path), compile=False))
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


def load_model(source: Any) -> LoadedModel:
    """Load ``source`` (a model object or a path) for export.

    Args:
        source: Keras 3 or tf.keras model, or a path to a ``.keras`` file, an
            ``.h5`` file, or a SavedModel directory.

    Raises:
        ExportError: the path does not exist or is not a supported format.
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
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ExportError(f"{str(path)!r} is a directory without saved_model.pb")
        return _load_saved_model(path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        import keras

        model = keras.saving.load_model(
            str(path), custom_objects=_keras_custom_objects(), compile=False
        )
        return from_keras(model)
    if suffix in (".h5", ".hdf5"):
        try:
            import tf_keras

            return from_keras(tf_keras.models.load_model(str(path), compile=False))
        except ImportError:
            import keras

            return from_keras(keras.saving.load_model(str(path), compile=False))
    raise ExportError(
        f"unsupported model file {str(path)!r}: expected .keras, .h5 or a SavedModel directory"
    )
