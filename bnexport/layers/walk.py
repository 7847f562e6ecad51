"""The one walk over a Keras model's layers: what Keras itself tracks, at any depth.

Keras builds its own view of a model from layer *tracking*: every ``Layer`` assigned to
an attribute of another layer (directly, or in a list/dict) is a tracked sublayer, and
``Layer._flatten_layers(include_self=False, recursive=False)`` returns them, in Keras 3
(``layer._layers``) and in tf.keras (``_self_tracked_trackables`` filtered to layers)
alike. Functional and Sequential models track the layers of their graph the same way.
:func:`walk_layers` follows exactly that, so it reaches layers nested in custom ``Layer``
subclasses (residual blocks, squeeze-excite blocks, ...) as deep as they go, not only
the layers of nested models.

Each layer object is yielded once, with its first *path*: the names from the root down,
joined by ``/`` (``backbone/block1/bn``; the root's own name is not part of it). A layer
reused in several places (the same object called twice) keeps its first path. Paths are
stable for a given model: they depend on layer names and tracking order only.

This module imports neither TensorFlow nor Keras; it only looks at the objects given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any


def sublayers(layer: Any) -> list[Any]:
    """The layers ``layer`` tracks directly (not recursively), in tracking order.

    Keras 3 and tf.keras: ``layer._flatten_layers(include_self=False, recursive=False)``;
    any other object with a ``layers`` attribute: that list.
    """
    flatten = getattr(layer, "_flatten_layers", None)
    if callable(flatten):
        try:
            return list(flatten(include_self=False, recursive=False))
        except TypeError:  # an older signature: fall back to the public list
            pass
    return list(getattr(layer, "layers", None) or [])


def walk_layers(root: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, layer)`` for every layer tracked under ``root``, depth first.

    Pre-order (a block before its sublayers), each layer object once (its first path),
    ``root`` itself excluded. Cycles cannot loop: a layer already seen is not entered.
    """
    seen: set[int] = {id(root)}

    def visit(layer: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for child in sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            yield path, child
            yield from visit(child, f"{path}/")

    yield from visit(root, "")


def is_model(layer: Any) -> bool:
    """Whether ``layer`` is a (nested) model: ``Functional``, ``Sequential`` or ``Model``."""
    return any(cls.__name__ in ("Functional", "Sequential", "Model") for cls in type(layer).__mro__)


def is_batch_norm(layer: Any) -> bool:
    """Whether ``layer`` is a batch-normalization layer of any supported kind.

    Duck-typed on the class hierarchy name (``*BatchNormalization``) and the inference
    variables, so Keras 3, tf.keras (``SyncBatchNormalization`` too) and bnexport's
    layers all match.
    """
    names = [cls.__name__ for cls in type(layer).__mro__]
    if not any(n.endswith("BatchNormalization") or n == "BatchNormalizationBase" for n in names):
        return False
    return all(hasattr(layer, attr) for attr in ("moving_mean", "moving_variance", "epsilon"))


def bn_layers(root: Any) -> list[tuple[str, Any]]:
    """``[(path, layer)]`` of every batch-normalization layer under ``root``, walk order."""
    return [(path, layer) for path, layer in walk_layers(root) if is_batch_norm(layer)]


def display_names(root: Any) -> dict[int, str]:
    """``{id(layer): name}`` — the name a report shows for each layer under ``root``.

    A layer's name is its path with the nested *models* left out (their layers are
    addressed by name, as ``model.get_layer`` does), so a layer of the graph keeps its
    plain name and a layer inside a custom block is ``block/.../layer``. Where two layers
    would get the same name, both get their full path instead.
    """
    entries = list(walk_layers(root))
    short: dict[int, str] = {}
    kind: dict[str, bool] = {}  # path -> whether that layer is a model
    for path, layer in entries:
        kind[path] = is_model(layer)
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        kept = [parts[i] for i, p in enumerate(prefixes) if not kind.get(p, False)]
        short[id(layer)] = "/".join([*kept, parts[-1]])
    counts = Counter(short.values())
    return {
        id(layer): short[id(layer)] if counts[short[id(layer)]] == 1 else path
        for path, layer in entries
    }
