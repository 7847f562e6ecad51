"""``bnexport.recalibrate``: exact population statistics for every BN layer (precise-BN).

An exponential moving average after a short or unstable training is a poor estimate
of the statistics a BN layer sees at inference. ``recalibrate`` replaces
``moving_mean``/``moving_variance`` of every batch-normalization layer in a model
(``bnexport.BatchNormalization`` and ``keras.layers.BatchNormalization``, nested
models included) with exact averages over ``steps`` batches of ``data``.

Each BN layer's ``call`` is wrapped by a hook that records, per batch, the count,
mean and ``M2 = Σ(x − mean)²`` of the layer's input over its reduction axes (in
float64; masked positions excluded). Two modes:

* ``mode="sequential"`` (default, exact for inference): layers are recalibrated one
  after another in call order; while layer *k* is measured the whole model runs in
  inference mode, so every upstream BN already uses its *recalibrated* statistics and
  dropout is off. The new statistics are the population mean and (biased) variance of
  everything layer *k* sees at inference over the ``steps`` batches, pooled across
  batches with Chan's formula (``M2 = Σ M2_b + Σ n_b (μ_b − μ)²``), i.e. including the
  spread of the batch means. Cost: one pass over the batches per BN layer.
* ``mode="parallel"`` (precise-BN of Wu & Johnson, 2021, one pass): every BN layer
  normalizes with its batch statistics (training behaviour, EMA updates discarded; other
  layers such as dropout stay in inference mode) and the new statistics are the
  count-weighted average of the per-batch means and of the per-batch (biased)
  variances — what the EMA estimates with momentum → 1. Cost: one pass.

Renorm layers also get ``moving_stddev = sqrt(variance + ε)``; their training-time
``renorm_mean``/``renorm_stddev`` are left alone. Layers with ``trainable=False`` are
frozen and skipped unless ``include_frozen=True``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from bnexport.errors import InputError
from bnexport.layers.batch_normalization import BatchNormalization

MODES = ("sequential", "parallel")


@dataclass
class LayerRecalibration:
    """What :func:`recalibrate` changed in one layer (float64 ``[C...]`` arrays).

    Attributes:
        count: number of elements per feature the statistics were computed from.
        old_mean, old_variance: the statistics before.
        mean, variance: the statistics written to the layer.
    """

    count: float
    old_mean: np.ndarray
    old_variance: np.ndarray
    mean: np.ndarray
    variance: np.ndarray

    @property
    def max_mean_change(self) -> float:
        """``max |mean − old_mean|``."""
        return float(np.max(np.abs(self.mean - self.old_mean), initial=0.0))

    @property
    def max_variance_ratio(self) -> float:
        """``max(max(v/old, old/v))`` over features (1.0: unchanged)."""
        eps = 1e-12
        ratio = (self.variance + eps) / (self.old_variance + eps)
        return float(np.max(np.maximum(ratio, 1.0 / ratio), initial=1.0))


class _Accumulator:
    """Exact running (count, mean, M2) per feature, combined batch by batch (Chan).

    Also keeps Σ nᵦ·varᵦ and Σ nᵦ for the precise-BN average of batch variances.
    """

    def __init__(self) -> None:
        self.n: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.batch_var_sum: np.ndarray | None = None

    def add(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        var = np.divide(m2, n, out=np.zeros_like(m2), where=n > 0)
        if self.n is None:
            self.n, self.mean, self.m2, self.batch_var_sum = n, mean, m2, n * var
            return
        total = self.n + n
        delta = mean - self.mean
        frac = np.divide(n, total, out=np.zeros_like(n), where=total > 0)
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2 + delta**2 * self.n * frac
        self.n = total
        self.batch_var_sum = self.batch_var_sum + n * var

    def result(self, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(count, mean, variance)``: pooled variance, or mean of batch variances."""
        n = self.n
        source = self.m2 if mode == "sequential" else self.batch_var_sum
        var = np.divide(source, n, out=np.zeros_like(source), where=n > 0)
        return n, self.mean, var


def _is_bn(layer: Any) -> bool:
    return isinstance(layer, (BatchNormalization, keras.layers.BatchNormalization))


def _find_bn_layers(model: keras.layers.Layer) -> dict[str, keras.layers.Layer]:
    """``path -> layer`` for every BN layer reachable from ``model`` (each once).

    The walk is :func:`bnexport.layers.walk.walk_layers` (nested models and custom
    layers at any depth); this module measures Keras 3 BN layers only.
    """
    from bnexport.layers.walk import walk_layers

    return {path: layer for path, layer in walk_layers(model) if _is_bn(layer)}


def _feature_axes(layer: Any, rank: int) -> list[int]:
    axis = layer.axis
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % rank for a in axes)


def _batches(data: Any, steps: int | None, batch_size: int) -> Iterator[Any]:
    """Yield the model inputs of ``steps`` batches (first element of tuples)."""
    if isinstance(data, (np.ndarray, tf.Tensor)):
        n = int(data.shape[0])
        source: Iterable[Any] = (data[i : i + batch_size] for i in range(0, n, batch_size))
    elif isinstance(data, tf.data.Dataset):
        if steps is None and data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise InputError("recalibrate: `data` is an infinite dataset; pass `steps`.")
        source = data
    elif isinstance(data, Iterable):
        source = data
    else:
        raise InputError(
            "recalibrate: `data` must be a tf.data.Dataset, an iterable of batches or an "
            f"array. Received: data={type(data).__name__}"
        )
    iterator = iter(source) if steps is None else itertools.islice(source, steps)
    for batch in iterator:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield batch


class _Hooks:
    """Wraps BN layers' ``call`` to record input moments as tensors of a traced step."""

    def __init__(self, layers: dict[str, Any], force_training: bool) -> None:
        self.layers = layers
        self.force_training = force_training
        self.captured: dict[str, list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]] = {}
        self.order: list[str] = []

    def __enter__(self) -> _Hooks:
        for path, layer in self.layers.items():
            layer.call = self._hook(path, layer, layer.call)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers.values():
            del layer.call  # back to the class method

    def _hook(self, path: str, layer: Any, original: Any) -> Any:
        def hooked(inputs: Any, training: Any = None, mask: Any = None, **kwargs: Any) -> Any:
            x = tf.cast(inputs, tf.float64)
            rank = x.shape.rank
            axes = [i for i in range(rank) if i not in _feature_axes(layer, rank)]
            if mask is None:
                weights = tf.ones_like(x)
            else:
                weights = tf.broadcast_to(
                    tf.expand_dims(tf.cast(mask, tf.float64), -1), tf.shape(x)
                )
            n = tf.reduce_sum(weights, axes)
            mean = tf.math.divide_no_nan(tf.reduce_sum(x * weights, axes), n)
            centered = x - tf.reshape(mean, [1 if i in axes else -1 for i in range(rank)])
            m2 = tf.reduce_sum(tf.square(centered) * weights, axes)
            self.captured.setdefault(path, []).append((n, mean, m2))
            if path not in self.order:
                self.order.append(path)
            training = True if self.force_training else training
            if mask is not None:
                kwargs["mask"] = mask
            return original(inputs, training=training, **kwargs)

        return hooked


def _measure(
    model: Any,
    layers: dict[str, Any],
    data: Any,
    steps: int | None,
    batch_size: int,
    force_training: bool,
) -> tuple[dict[str, _Accumulator], list[str], int]:
    """Run the model over the batches with hooks; return per-layer accumulators."""
    stats = {path: _Accumulator() for path in layers}
    hooks = _Hooks(layers, force_training)
    batches = 0
    with hooks:

        @tf.function(reduce_retracing=True)
        def step(x: Any) -> dict[str, list[tuple[tf.Tensor, ...]]]:
            hooks.captured.clear()
            model(x, training=False)
            return dict(hooks.captured)

        for x in _batches(data, steps, batch_size):
            for path, records in step(x).items():
                for n, mean, m2 in records:
                    stats[path].add(n.numpy(), mean.numpy(), m2.numpy())
            batches += 1
    return stats, hooks.order, batches


def _write(layer: Any, mean: np.ndarray, variance: np.ndarray) -> None:
    shape = tuple(layer.moving_mean.shape)
    layer.moving_mean.assign(np.reshape(mean, shape).astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(np.reshape(variance, shape).astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        layer.moving_stddev.assign(
            np.sqrt(np.reshape(variance, shape) + layer.epsilon).astype(layer.moving_stddev.dtype)
        )


def recalibrate(
    model: keras.layers.Layer,
    data: Any,
    steps: int | None = None,
    *,
    mode: str = "sequential",
    batch_size: int = 32,
    include_frozen: bool = False,
) -> dict[str, LayerRecalibration]:
    """Recompute every BN layer's moving mean and variance exactly over ``steps`` batches.

    Args:
        model: a built Keras model (or layer) containing BN layers, possibly nested.
        data: a ``tf.data.Dataset``, an iterable of batches (``x`` or ``(x, y, ...)``
            tuples) or an array split into batches of ``batch_size``.
        steps: number of batches to use (``None``: all of ``data``; required for an
            infinite dataset). In sequential mode a one-shot iterator's ``steps``
            batches are kept in memory to be replayed for each layer.
        mode: ``"sequential"`` (exact inference statistics, one pass per BN layer) or
            ``"parallel"`` (precise-BN, one pass); see the module docstring.
        batch_size: batch size when ``data`` is an array.
        include_frozen: also recalibrate BN layers with ``trainable=False``.

    Returns:
        ``{layer path: LayerRecalibration}`` for every recalibrated layer, in call order
        (the path is the layer name prefixed by its enclosing models' names).

    Raises:
        InputError: ``data`` is unusable, yields no batch, or ``mode`` is unknown.
    """
    if mode not in MODES:
        raise InputError(f"recalibrate: `mode` must be one of {list(MODES)}. Received: {mode!r}")
    layers = {
        path: layer
        for path, layer in _find_bn_layers(model).items()
        if include_frozen or layer.trainable
    }
    if not layers:
        return {}
    for layer in layers.values():
        if not layer.built:
            raise InputError(f"recalibrate: layer '{layer.name}' is not built; call the model once")
    before = {
        path: (
            np.array(layer.moving_mean.numpy(), np.float64),
            np.array(layer.moving_variance.numpy(), np.float64),
        )
        for path, layer in layers.items()
    }
    snapshot = {
        id(v): (v, v.numpy()) for layer in layers.values() for v in layer.non_trainable_weights
    }
    if mode == "sequential" and isinstance(data, Iterator):
        # one pass per layer: a one-shot iterator is replayed from memory
        data, steps = list(_batches(data, steps, batch_size)), None
    report: dict[str, LayerRecalibration] = {}
    try:
        if mode == "parallel":
            stats, order, batches = _measure(model, layers, data, steps, batch_size, True)
            _check_batches(batches)
            for v, value in snapshot.values():  # discard the EMA updates of the pass
                v.assign(value)
            results = {path: stats[path].result(mode) for path in order}
        else:
            # first pass finds the call order and measures the first layer
            stats, order, batches = _measure(model, layers, data, steps, batch_size, False)
            _check_batches(batches)
            results = {}
            for k, path in enumerate(order):
                if k > 0:  # upstream layers now hold their new statistics
                    stats, _, _ = _measure(
                        model, {path: layers[path]}, data, steps, batch_size, False
                    )
                results[path] = stats[path].result(mode)
                _write(layers[path], results[path][1], results[path][2])
    except BaseException:
        for v, value in snapshot.values():
            v.assign(value)
        raise
    for path, (count, mean, variance) in results.items():
        _write(layers[path], mean, variance)
        old_mean, old_variance = before[path]
        report[path] = LayerRecalibration(
            count=float(np.min(count)) if np.size(count) else 0.0,
            old_mean=old_mean,
            old_variance=old_variance,
            mean=np.reshape(mean, old_mean.shape),
            variance=np.reshape(variance, old_variance.shape),
        )
    return report


def _check_batches(batches: int) -> None:
    if batches == 0:
        raise InputError("recalibrate: `data` yielded no batch (check `data` and `steps`).")
