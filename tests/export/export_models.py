"""Helpers for the exporter tests: small models, randomized BN statistics, ORT runs.

Tolerances of an exported graph (onnxruntime, graph optimizations disabled) against the
Keras model in inference mode, per output:

- float32: ``max|onnx − keras| <= 1e-4·max|keras| + 1e-5``;
- float16: ``max|onnx − keras| <= 2e-2·max|keras| + 1e-3``.
"""

from __future__ import annotations

import numpy as np
import onnx
from support import op_counts, run_ort  # noqa: F401 - op_counts re-exported for the tests

TOL = {"float32": (1e-4, 1e-5), "float16": (2e-2, 1e-3)}

#: op types a BN may leave behind (BatchNormalization, or a per-channel Mul/Add)
BN_OPS = ("BatchNormalization", "Mul", "Add", "FusedNorm")


def randomize_bn(
    model, seed: int = 0, var_range=(0.3, 2.0), gamma_range=(0.5, 1.5), shift: float = 1.0
) -> None:
    """Give every BN layer (any kind, nested too) non-trivial statistics and affine params.

    ``moving_variance ~ U(var_range)``, ``gamma ~ U(gamma_range)``, ``moving_mean ~
    N(0, 0.5·shift)``, ``beta ~ N(0, 0.3·shift)``. Very deep models want narrower ranges: each BN
    multiplies activations by ``gamma/sqrt(var)``, and over hundreds of layers the wide
    defaults drive logits to ~100, where float32 reordering alone (a few ulps per layer)
    exceeds an elementwise 1e-4 bound on the logits near zero; trained models keep
    activations near unit scale.
    """
    from bnexport.export.bn_layers import is_batch_norm, walk_layers

    rng = np.random.default_rng(seed)
    for _, layer in walk_layers(model):
        if not is_batch_norm(layer):
            continue
        shape = tuple(layer.moving_mean.shape)
        layer.moving_mean.assign(rng.normal(0.0, 0.5 * shift, shape).astype(np.float32))
        layer.moving_variance.assign(rng.uniform(*var_range, shape).astype(np.float32))
        if getattr(layer, "gamma", None) is not None:
            layer.gamma.assign(rng.uniform(*gamma_range, shape).astype(np.float32))
        if getattr(layer, "beta", None) is not None:
            layer.beta.assign(rng.normal(0.0, 0.3 * shift, shape).astype(np.float32))


def randomize_biases(model, seed: int = 1) -> None:
    """Non-zero conv/dense biases (zero biases are optimized away by grappler)."""
    from bnexport.export.bn_layers import walk_layers

    rng = np.random.default_rng(seed)
    for _, layer in walk_layers(model):
        bias = getattr(layer, "bias", None)
        if bias is not None and hasattr(bias, "assign"):
            bias.assign(rng.normal(0.0, 0.2, tuple(bias.shape)).astype(np.float32))


def run_onnx(path_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with onnxruntime, graph optimizations off (ORT's own fusions must not hide bugs)."""
    model = (
        path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(path_or_model)
    )
    initializers = {t.name for t in model.graph.initializer}
    typed = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        half = inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        typed[inp.name] = feeds[inp.name].astype(np.float16 if half else np.float32)
    return run_ort(model, typed, threads=2)


def assert_matches_keras(path, keras_model, feeds: dict[str, np.ndarray], dtype="float32"):
    """Outputs of the ONNX file vs ``keras_model(..., training=False)`` within ``TOL[dtype]``."""
    import tensorflow as tf

    args = list(feeds.values())
    ref = tf.nest.flatten(keras_model(args[0] if len(args) == 1 else args, training=False))
    got = run_onnx(path, feeds)
    rtol, atol = TOL[dtype]
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        r = np.asarray(r, np.float64)
        g = np.asarray(g, np.float64)
        assert g.shape == r.shape
        err = float(np.max(np.abs(g - r)))
        tol = rtol * float(np.max(np.abs(r))) + atol
        assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def image_feed(name: str, shape, seed: int = 3, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)}


def bn_derived_nodes(path_or_model) -> list[str]:
    """BatchNormalization/FusedNorm nodes, Mul by a per-channel constant, and the Add of
    a per-channel constant that follows such a Mul (a BN's ``x·scale + shift``)."""
    model = (
        path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(path_or_model)
    )
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def per_channel(node) -> bool:
        return any(n in inits and int(np.prod(inits[n].dims)) > 1 for n in node.input)

    found = []
    for node in model.graph.node:
        if node.op_type in ("BatchNormalization", "FusedNorm"):
            found.append(node.name)
        elif node.op_type == "Mul" and per_channel(node):
            found.append(node.name)
        elif node.op_type == "Add" and per_channel(node):
            prev = [producers.get(n) for n in node.input]
            if any(p is not None and p.op_type == "Mul" and per_channel(p) for p in prev):
                found.append(node.name)
    return found
