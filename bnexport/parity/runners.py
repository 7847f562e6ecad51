"""Interchangeable runners (Polygraphy style): Keras, onnxruntime and TensorRT.

Every runner has the same public life cycle, each step calling a ``*_impl``
method of the subclass::

    with OnnxrtRunner("model.onnx") as runner:      # activate(): build the session
        meta = runner.get_input_metadata()         # [TensorInfo(name, dtype, shape)]
        outputs = runner.infer({"x": x})           # {name: np.ndarray}
                                                   # deactivate() on exit

A runner takes either the object it runs or a *loader*: a zero-argument
callable returning it, called in ``activate`` so expensive things (loading
Keras, building a TensorRT engine) happen only when the runner is used.
Keras and TensorFlow are imported only by :class:`KerasRunner`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.errors import InputError
from bnexport.runtime.io_check import TensorInfo

#: prefix of the keys under which :class:`KerasRunner` returns intermediate layer outputs
LAYER_PREFIX = "layer:"


class BaseRunner:
    """Common life cycle of every runner; subclasses implement the ``*_impl`` methods.

    Args:
        name: name shown in reports (e.g. ``"onnxruntime"``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self.last_inference_time: float | None = None

    # public API -----------------------------------------------------------------------------
    def activate(self) -> None:
        """Build what the runner needs (idempotent)."""
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def get_input_metadata(self) -> list[TensorInfo]:
        """The inputs the runner expects."""
        self._require_active("get_input_metadata")
        return self.get_input_metadata_impl()

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one feed ``{input name: array}``; returns ``{output name: array}``."""
        self._require_active("infer")
        start = time.perf_counter()
        out = self.infer_impl(feed)
        self.last_inference_time = time.perf_counter() - start
        return out

    def deactivate(self) -> None:
        """Release what ``activate`` built (idempotent)."""
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # subclass hooks ---------------------------------------------------------------------------
    def activate_impl(self) -> None:  # noqa: D102
        raise NotImplementedError

    def get_input_metadata_impl(self) -> list[TensorInfo]:  # noqa: D102
        raise NotImplementedError

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        raise NotImplementedError

    def deactivate_impl(self) -> None:  # noqa: D102
        raise NotImplementedError

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name!r}: call activate() before {what}()")


def _resolve(obj_or_loader: Any, is_object: Callable[[Any], bool]) -> Any:
    if is_object(obj_or_loader) or not callable(obj_or_loader):
        return obj_or_loader
    return obj_or_loader()


def _strip_port(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


class KerasRunner(BaseRunner):
    """Runs a Keras model (the parity reference).

    Args:
        model_or_loader: a ``keras.Model`` or a callable returning one.
        training: the ``training`` argument of the call (``False``: inference mode).
        layer_outputs: names of layers whose outputs are also returned, under
            ``"layer:<name>"`` keys (the model is rewired as
            ``keras.Model(inputs, outputs + layer outputs)``).
        captured_layers: ``{name: layer}`` of layers without a graph output of their
            own (inside custom blocks or nested models): their ``call`` is wrapped on
            the instance while the model runs (restored afterwards) and its output is
            returned under ``"layer:<name>"`` too. A layer called more than once per
            forward pass is returned as ``None`` (no single output to compare).
        batch_size: samples per call (bounds memory).
        name: runner name.
    """

    def __init__(
        self,
        model_or_loader: Any,
        *,
        training: bool = False,
        layer_outputs: Sequence[str] = (),
        captured_layers: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        name: str = "keras",
    ) -> None:
        super().__init__(name)
        self._source = model_or_loader
        self.training = training
        self.layer_outputs = list(layer_outputs)
        self.captured_layers = dict(captured_layers or {})
        self.batch_size = batch_size
        self.model: Any = None
        self.output_names: list[str] = []

    def activate_impl(self) -> None:  # noqa: D102
        model = _resolve(self._source, is_keras_model)
        if not is_keras_model(model):
            raise InputError(f"KerasRunner needs a Keras model. Received: {type(model).__name__}")
        kmod = keras_module(model)
        self.source_model = model
        self.output_names = keras_output_names(model)
        outputs = (
            list(kmod.tree.flatten(model.outputs)) if hasattr(kmod, "tree") else list(model.outputs)
        )
        extra = [model.get_layer(n).output for n in self.layer_outputs]
        self.model = kmod.Model(model.inputs, outputs + extra, name=f"{model.name}_probe")
        self._input_names = keras_input_names(model)

    def get_input_metadata_impl(self) -> list[TensorInfo]:  # noqa: D102
        return [
            TensorInfo(n, np.dtype(getattr(t.dtype, "name", t.dtype)), tuple(t.shape))
            for n, t in zip(self._input_names, self.source_model.inputs, strict=True)
        ]

    def _order_feed(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = [_strip_port(k) for k in feed]
        if sorted(names) == sorted(self._input_names):
            by = {_strip_port(k): v for k, v in feed.items()}
            return [by[n] for n in self._input_names]
        if len(feed) == len(self._input_names):  # names differ (exporter renamed): by position
            return list(feed.values())
        raise InputError(
            f"KerasRunner: the model expects inputs {self._input_names}, received {list(feed)}"
        )

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        arrays = self._order_feed(feed)
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        chunks: list[list[np.ndarray]] = []
        records: dict[str, list[Any]] = {name: [] for name in self.captured_layers}
        with _capturing(self.captured_layers, records):
            for start in range(0, max(n, 1), self.batch_size):
                part = [a[start : start + self.batch_size] for a in arrays]
                calls = {name: len(r) for name, r in records.items()}
                result = self.model(part, training=self.training)
                flat = result if isinstance(result, list | tuple) else [result]
                chunks.append([np.asarray(t) for t in flat])
                for name, r in records.items():  # one call per forward pass, or none
                    if len(r) != calls[name] + 1:
                        r.append(None)
        joined = [np.concatenate([c[i] for c in chunks], axis=0) for i in range(len(chunks[0]))]
        names = self.output_names + [LAYER_PREFIX + n for n in self.layer_outputs]
        out = dict(zip(names, joined, strict=True))
        for name, r in records.items():
            single = len(r) == len(chunks) and all(v is not None for v in r)
            out[LAYER_PREFIX + name] = np.concatenate(r, axis=0) if single else None
        return out

    def deactivate_impl(self) -> None:  # noqa: D102
        self.model = None


@contextlib.contextmanager
def _capturing(layers: Mapping[str, Any], records: dict[str, list[Any]]) -> Iterator[None]:
    """Record each layer's ``call`` output (NumPy) into ``records[name]`` while active.

    The wrapper is an instance attribute set with ``object.__setattr__`` (Keras's
    tracking is bypassed) and removed in a ``finally``. A second call of the same layer
    within one forward pass marks it (``None`` appended) as having no single output.
    """
    patched: list[Any] = []

    def wrap(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def recording_call(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            value = out[0] if isinstance(out, list | tuple) and len(out) == 1 else out
            try:
                records[name].append(np.asarray(value))
            except (TypeError, ValueError):  # several outputs, or not an eager tensor
                records[name].append(None)
            return out

        return recording_call

    try:
        for name, layer in layers.items():
            if "call" in layer.__dict__:  # already wrapped on the instance: leave it
                continue
            object.__setattr__(layer, "call", wrap(name, layer.call))
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            with contextlib.suppress(AttributeError):
                object.__delattr__(layer, "call")


def is_keras_model(obj: Any) -> bool:
    """A built Keras 3 or tf.keras model (has ``layers``, ``inputs`` and ``get_layer``)."""
    return all(hasattr(obj, a) for a in ("layers", "inputs", "get_layer")) and not isinstance(
        obj, type
    )


def keras_module(model: Any) -> Any:
    """``tf_keras`` for a legacy tf.keras model, ``keras`` (Keras 3) otherwise."""
    if type(model).__module__.startswith(("tf_keras", "keras.src.legacy", "tensorflow.python")):
        import tf_keras

        return tf_keras
    import keras

    return keras


def _exporter_io(model: Any) -> Any:
    try:
        from bnexport.export.loaders import from_keras
    except ImportError:
        return None
    try:
        return from_keras(model)
    except Exception:  # noqa: BLE001 - fall back to Keras' own names
        return None


def keras_input_names(model: Any) -> list[str]:
    """Input names as the exporter writes them (Keras input names otherwise)."""
    loaded = _exporter_io(model)
    if loaded is not None:
        return [t.name for t in loaded.inputs]
    return [_strip_port(t.name) for t in model.inputs]


def keras_output_names(model: Any) -> list[str]:
    """Output names as the exporter writes them (else dict keys, ``output_names``...)."""
    loaded = _exporter_io(model)
    if loaded is not None:
        return [t.name for t in loaded.outputs]
    if isinstance(model.output, dict):
        return list(model.output.keys())
    names = getattr(model, "output_names", None)
    n = len(model.outputs)
    if names and len(names) == n:
        return [_strip_port(str(x)) for x in names]
    return [f"output_{i}" for i in range(n)]


class SessionRunner(BaseRunner):
    """Runs an ONNX model through :class:`bnexport.Session` with a given backend.

    Args:
        model_or_loader: path, bytes or ``onnx.ModelProto``, or a callable returning one.
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        name: runner name (default: the backend).
        **session_kwargs: more :class:`~bnexport.runtime.Session` arguments
            (``device``, ``precision``, ``max_batch``, ``providers_options``...).
    """

    def __init__(
        self, model_or_loader: Any, *, backend: str, name: str | None = None, **session_kwargs: Any
    ) -> None:
        super().__init__(name or backend)
        self._source = model_or_loader
        self.backend = backend
        self.session_kwargs = session_kwargs
        self.session: Any = None

    def activate_impl(self) -> None:  # noqa: D102
        from bnexport.runtime.session import Session

        source = _resolve(self._source, lambda o: not callable(o))
        self.session = Session(source, backend=self.backend, **self.session_kwargs)

    def get_input_metadata_impl(self) -> list[TensorInfo]:  # noqa: D102
        return list(self.session.inputs)

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        return self.session.run(dict(feed))

    def deactivate_impl(self) -> None:  # noqa: D102
        self.session.close()
        self.session = None


class OnnxrtRunner(SessionRunner):
    """onnxruntime runner (CPU by default); see :class:`SessionRunner`."""

    def __init__(self, model_or_loader: Any, *, name: str = "onnxruntime", **kwargs: Any) -> None:
        super().__init__(model_or_loader, backend="onnxruntime", name=name, **kwargs)


class TrtRunner(SessionRunner):
    """TensorRT runner (``device="cuda"``); see :class:`SessionRunner`."""

    def __init__(self, model_or_loader: Any, *, name: str = "tensorrt", **kwargs: Any) -> None:
        kwargs.setdefault("device", "cuda")
        super().__init__(model_or_loader, backend="tensorrt", name=name, **kwargs)


def make_runner(backend: str, model_or_loader: Any, **kwargs: Any) -> SessionRunner:
    """The runner for a backend name (``"onnxruntime"`` or ``"tensorrt"``)."""
    if backend == "onnxruntime":
        return OnnxrtRunner(model_or_loader, **kwargs)
    if backend == "tensorrt":
        return TrtRunner(model_or_loader, **kwargs)
    raise InputError(f"unknown backend {backend!r}; expected 'onnxruntime' or 'tensorrt'")
