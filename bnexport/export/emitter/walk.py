"""Walk a Keras model's functional graph and emit each layer call through its converter.

The walk is Keras's own: ``Function._run_through_graph(inputs, call_fn=f)`` visits every
node of a ``Functional`` model (a ``Sequential`` model's ``_functional``) in dependency
order and calls ``f(operation, *args, **kwargs)`` with the values computed so far, here
emitted :class:`~bnexport.export.emitter.values.Tensor` objects. Shared layers and
nested models come for free: a nested model is walked by the same function, its inputs
aliased to the outer tensors.

``_run_through_graph(..., call_fn=)`` is private Keras API (``call_fn`` since Keras 3.4.0,
below the ``keras>=3.5`` bound of pyproject.toml; ``tests/export/test_emitter_walk.py``
fails loudly if it changes).

Which node is being called: ``call_fn`` receives the operation, not the node. The node is
the operation's inbound node in this graph whose input tensors are the Keras tensors the
arguments stand for (each emitted Tensor remembers its ``keras_id``); its outputs give the
output shapes and, from the graph's ``_nodes_by_depth``, how many nodes consume each output
(a BN folds at emission only into a convolution it alone consumes).

Custom ``Layer`` subclasses without a converter are *inlined*: their ``call`` runs on fresh
``KerasTensor`` objects, which records the layers and ``keras.ops`` it uses as a small
functional graph (no backend computation), walked the same way. A layer whose ``call``
cannot run symbolically (raw backend ops) raises :class:`~.registry.UnsupportedLayer`.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any

from bnexport.errors import ExportError
from bnexport.export.emitter.registry import EmitContext, UnsupportedLayer, find
from bnexport.export.emitter.values import Tensor
from bnexport.layers.walk import is_batch_norm


def function_of(model: Any) -> Any | None:
    """The functional graph of ``model`` (``Functional``, or ``Sequential``'s), else ``None``."""
    inner = getattr(model, "_functional", None)
    if inner is not None:
        return inner
    if hasattr(model, "_nodes_by_depth") and hasattr(model, "_run_through_graph"):
        try:
            model.inputs  # noqa: B018 - a subclassed Model has no graph inputs
        except (AttributeError, ValueError):
            return None
        return model if getattr(model, "inputs", None) else None
    return None


def consumer_counts(function: Any) -> Counter[int]:
    """``{id(keras tensor): consumers}`` in ``function``: node inputs plus model outputs."""
    counts: Counter[int] = Counter()
    for nodes in function._nodes_by_depth.values():  # noqa: SLF001 - see module doc
        for node in nodes:
            if node.operation is None or node.is_input:
                continue
            for tensor in node.input_tensors:
                counts[id(tensor)] += 1
    for tensor in function.outputs:
        counts[id(tensor)] += 1
    return counts


def _flat_tensors(structure: Any) -> list[Tensor]:
    from keras import tree

    return [x for x in tree.flatten(structure) if isinstance(x, Tensor)]


def run_function(ctx: EmitContext, function: Any, inputs: list[Tensor], scope: str) -> list[Tensor]:
    """Emit ``function``'s graph on ``inputs``; the emitted outputs, flattened.

    Args:
        ctx: the export's state.
        function: a Keras ``Function`` (``Functional`` model or an inlined call).
        inputs: one emitted tensor per ``function.inputs``.
        scope: prefix of the names of ``keras.ops`` nodes (the enclosing layer, or "").
    """
    from keras import tree

    counts = consumer_counts(function)
    pending: dict[int, list[Any]] = {}
    for nodes in function._nodes_by_depth.values():  # noqa: SLF001
        for node in nodes:
            if node.operation is not None and not node.is_input:
                pending.setdefault(id(node.operation), []).append(node)
    if len(inputs) != len(function.inputs):
        raise UnsupportedLayer(scope or "model", "input structure differs from the graph's")
    aliased = [
        t.alias(id(kt), counts.get(id(kt), 0))
        for t, kt in zip(inputs, function.inputs, strict=True)
    ]

    def call_fn(op: Any, *args: Any, **kwargs: Any) -> Any:
        ids = [t.keras_id for t in _flat_tensors((args, kwargs))]
        candidates = pending.get(id(op), [])
        node = next(
            (n for n in candidates if [id(t) for t in n.input_tensors] == ids),
            next((n for n in candidates if sorted(map(id, n.input_tensors)) == sorted(ids)), None),
        )
        if node is None:
            raise UnsupportedLayer(
                ctx.layer_name(op), "could not find its node in the functional graph"
            )
        candidates.remove(node)
        outputs = list(node.outputs)
        return convert_call(ctx, op, args, kwargs, outputs, counts, scope)

    result = function._run_through_graph(aliased, call_fn=call_fn)  # noqa: SLF001
    return list(tree.flatten(result))


def convert_call(
    ctx: EmitContext,
    op: Any,
    args: tuple,
    kwargs: dict,
    outputs: list[Any],
    counts: Counter[int],
    scope: str,
) -> Any:
    """Emit one call of ``op``; return what ``_run_through_graph`` stores for its outputs."""
    from keras import Layer, tree

    is_layer = isinstance(op, Layer)
    name = ctx.layer_name(op) if is_layer else f"{scope}{getattr(op, 'name', type(op).__name__)}"
    out_ids = [id(o) for o in outputs]
    out_counts = [counts.get(i, 0) for i in out_ids]

    compute = str(getattr(op, "compute_dtype", "float32")) if is_layer else "float32"
    if compute not in ("float32", "int32", "int64", "bool"):
        # mixed precision: the graph would need Keras's casts; tf2onnx traces them
        raise UnsupportedLayer(name, f"compute dtype {compute} (only float32 is emitted)")
    inner = function_of(op) if is_layer else None
    if inner is not None:  # a nested Functional / Sequential model: walk it
        flat = _flat_tensors(args[:1] if args else kwargs)
        results = run_function(ctx, inner, flat, "")
        return [r.alias(i, c) for r, i, c in zip(results, out_ids, out_counts, strict=True)]
    converter = None
    if is_layer and is_batch_norm(op):
        from bnexport.export.emitter.convert_norm import batch_norm as converter
    elif not (is_layer and _is_model_class(op)):
        converter = find(op)  # a subclassed model (no graph) is inlined like a custom layer
    if converter is None:
        if not is_layer:
            raise UnsupportedLayer(
                name, f"keras.ops operation {type(op).__name__} has no converter"
            )
        results = _inline(ctx, op, name, args, kwargs)
        return [r.alias(i, c) for r, i, c in zip(results, out_ids, out_counts, strict=True)]

    saved = (ctx.name, ctx.out_specs, ctx.out_ids, ctx.consumers, ctx.b.layer)
    ctx.name, ctx.out_specs, ctx.out_ids, ctx.consumers = name, outputs, out_ids, out_counts
    ctx.b.layer = name
    try:
        result = converter(ctx, op, args, kwargs)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a case the converter does not handle
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UnsupportedLayer(
            name, f"{type(op).__name__} converter failed ({type(exc).__name__}: {first})"
        ) from exc
    finally:
        ctx.name, ctx.out_specs, ctx.out_ids, ctx.consumers, ctx.b.layer = saved
    flat = list(tree.flatten(result))
    if is_layer and len(flat) == 1 and name not in ctx.layer_values:
        ctx.layer_values[name] = (flat[0].value, flat[0].perm)
    return result


def _is_model_class(op: Any) -> bool:
    return any(cls.__name__ in ("Functional", "Sequential", "Model") for cls in type(op).__mro__)


def _inline(ctx: EmitContext, layer: Any, name: str, args: tuple, kwargs: dict) -> list[Tensor]:
    """Emit a custom layer by running its ``call`` on symbolic tensors (see module doc)."""
    from keras import KerasTensor, tree
    from keras.src.ops.function import Function

    order: list[Tensor] = []
    symbols: list[Any] = []

    def to_symbol(x: Any) -> Any:
        if isinstance(x, Tensor):
            symbol = KerasTensor(shape=x.shape, dtype=x.dtype)
            order.append(x)
            symbols.append(symbol)
            return symbol
        return x

    sym_args, sym_kwargs = tree.map_structure(to_symbol, (tuple(args), dict(kwargs)))
    try:
        params = inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        params = {}
    sym_kwargs.pop("training", None)
    if "training" in params:
        sym_kwargs["training"] = False
    sym_kwargs.pop("mask", None)
    try:
        result = layer.call(*sym_args, **sym_kwargs)
        flat_out = list(tree.flatten(result))
        if not all(isinstance(o, KerasTensor) for o in flat_out):
            raise TypeError("call returned something that is not a tensor")
        function = Function(symbols, flat_out, name=f"{layer.name}_inlined")
    except UnsupportedLayer:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: not expressible here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedLayer(
            name,
            f"custom layer {type(layer).__name__} could not be inlined "
            f"({type(exc).__name__}: {first[:200]})",
        ) from exc
    return run_function(ctx, function, order, f"{name}/")
