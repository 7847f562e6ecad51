"""The converter table: Keras layer and ``keras.ops`` operation classes → ONNX emitters.

A converter is ``fn(ctx, op, args, kwargs) -> Tensor | list[Tensor]``: ``op`` is the layer
or operation object, ``args``/``kwargs`` its call arguments with every Keras tensor
replaced by the emitted :class:`~bnexport.export.emitter.values.Tensor`. Layers and
operations are looked up by class name along the MRO, in separate tables (``Add`` is both
a merge layer and ``keras.ops.add``). A layer subclass that overrides ``call`` is *not*
converted as its base class: its own code decides what it computes, so it is inlined
(:mod:`.walk`) instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bnexport.errors import ExportError
from bnexport.export.emitter.builder import Builder
from bnexport.export.emitter.values import Linear, Tensor
from bnexport.export.report import FoldRecord

Converter = Callable[["EmitContext", Any, tuple, dict], Any]

_LAYERS: dict[str, Converter] = {}
_OPS: dict[str, Converter] = {}


class UnsupportedLayer(ExportError):
    """The emitter has no converter for a layer or op (the model takes the other engine).

    Attributes:
        layer: the layer's name (as reports show it).
        what: the class name, or the option that is not supported.
    """

    def __init__(self, layer: str, what: str) -> None:
        super().__init__(f"layer {layer!r}: {what}")
        self.layer = layer
        self.what = what


def register(*class_names: str, kind: str = "layer") -> Callable[[Converter], Converter]:
    """Register a converter for the layer (``kind="layer"``) or op classes named."""
    table = _LAYERS if kind == "layer" else _OPS

    def decorate(fn: Converter) -> Converter:
        for name in class_names:
            table[name] = fn
        return fn

    return decorate


def find(op: Any) -> Converter | None:
    """The converter for ``op``, or ``None`` (see the module doc for subclasses)."""
    from keras import Layer

    is_layer = isinstance(op, Layer)
    table = _LAYERS if is_layer else _OPS
    call = getattr(type(op), "call", None)
    for cls in type(op).__mro__:
        fn = table.get(cls.__name__)
        if fn is None:
            continue
        if is_layer and getattr(cls, "call", None) is not call:
            return None  # a subclass with its own call: inline it
        return fn
    return None


def known_layers() -> list[str]:
    """Names of the layer classes with a converter."""
    return sorted(_LAYERS)


def known_ops() -> list[str]:
    """Names of the ``keras.ops`` operation classes with a converter."""
    return sorted(_OPS)


@dataclasses.dataclass
class EmitContext:
    """State shared by the walk and the converters of one export.

    Attributes:
        b: the graph builder.
        bns: ``{id(layer): BNLayer}`` — every BN layer's float64 scale/shift.
        names: ``{id(layer): name}`` as reports show layers.
        records: BNs folded while emitting (one record each).
        bn_nodes: ``{onnx node: BN layer}`` for BNs left to the fold passes.
        layer_values: ``{layer: (value, perm)}`` — each layer's first output.
        name: the layer being converted.
        out_specs: the Keras output tensors of the call being converted.
        consumers: consumer counts of those outputs in the graph being walked.
        opset: the default-domain opset.
    """

    b: Builder
    bns: dict[int, Any]
    names: dict[int, str]
    records: list[FoldRecord] = dataclasses.field(default_factory=list)
    bn_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    layer_values: dict[str, tuple[Any, tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    name: str = ""
    out_specs: list[Any] = dataclasses.field(default_factory=list)
    out_ids: list[int] = dataclasses.field(default_factory=list)
    consumers: list[int] = dataclasses.field(default_factory=list)

    @property
    def opset(self) -> int:
        """The default-domain opset."""
        return self.b.opset

    def layer_name(self, op: Any) -> str:
        """The report name of ``op`` (its own name when it is not tracked)."""
        return self.names.get(id(op)) or str(getattr(op, "name", type(op).__name__))

    def unsupported(self, what: str) -> UnsupportedLayer:
        """The error that sends the model to the other engine, naming this layer."""
        return UnsupportedLayer(self.name, what)

    def out(
        self,
        value: Any,
        perm: tuple[int, ...],
        index: int = 0,
        linear: Linear | None = None,
    ) -> Tensor:
        """The :class:`Tensor` for output ``index`` of the call being converted."""
        spec = self.out_specs[index] if index < len(self.out_specs) else None
        shape = tuple(spec.shape) if spec is not None else ()
        dtype = str(getattr(spec, "dtype", "float32")) if spec is not None else "float32"
        if spec is not None and len(perm) != len(shape):
            raise self.unsupported(
                f"internal layout error: perm {perm} for output of shape {shape}"
            )
        return Tensor(
            value=value,
            perm=tuple(perm),
            shape=shape,
            dtype=dtype,
            keras_id=self.out_ids[index] if index < len(self.out_ids) else None,
            consumers=self.consumers[index] if index < len(self.consumers) else 0,
            linear=linear,
        )
