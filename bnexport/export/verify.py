"""Check that the exported graph computes what the source model does.

The source model runs in inference mode (``training=False``) in TensorFlow, the ONNX graph
in onnxruntime (graphs with ``bnexport::FusedNorm`` nodes through the plugin's CPU path,
``bnexport_plugins.fused_norm.ort_cpu.make_cpu_session``), both on the same generated
inputs. Every output ``o`` must satisfy::

    max|onnx_o − ref_o| <= rtol · max|ref_o| + atol

Tolerances per dtype (``ref`` is float32 TensorFlow):

* float32: ``rtol = 1e-4``, ``atol = 1e-5`` — a folded graph reorders float32 products
  (``(W·s)·x`` instead of ``(W·x)·s``), which moves results by a few ulps per layer.
* float16: ``rtol = 2e-2``, ``atol = 1e-3`` — float16 has an 11-bit significand
  (ε ≈ 9.8e-4); activations and accumulations round at every layer, so errors grow with
  depth to about 1% of the output's range on 50-layer CNNs.

Generated inputs (seeded): rank-4 float inputs are treated as images, uniform in
``[-1, 1)`` (the range Keras applications' ``preprocess_input`` produces); other float
inputs are standard normal; integer inputs are uniform in ``[0, 10)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnexport.errors import VerificationError
from bnexport.export.loaders import LoadedModel, TensorInfo
from bnexport.export.report import VerifyResult

TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-4, 1e-5), "float16": (2e-2, 1e-3)}


def make_inputs(inputs: list[TensorInfo], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for ``inputs`` with batch size ``batch`` (``None`` dims become 8)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        shape = [batch, *[8 if d is None else int(d) for d in info.shape[1:]]]
        dtype = np.dtype(info.dtype if info.dtype not in ("float", "half") else "float32")
        if np.issubdtype(dtype, np.floating):
            if len(shape) == 4:
                value = rng.uniform(-1.0, 1.0, size=shape)
            else:
                value = rng.standard_normal(size=shape)
        elif np.issubdtype(dtype, np.bool_):
            value = rng.integers(0, 2, size=shape)
        else:
            value = rng.integers(0, 10, size=shape)
        feeds[info.name] = value.astype(dtype)
    return feeds


def run_reference(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the source model in inference mode; ``{output name: array}``."""
    import tensorflow as tf

    args = [feeds[i.name] for i in loaded.inputs]
    if loaded.is_keras:
        result = loaded.model(args[0] if len(args) == 1 else args, training=False)
        flat = tf.nest.flatten(result)
    else:
        tensors = {k: tf.constant(a) for k, a in zip(loaded.signature_keys, args, strict=True)}
        result = loaded.model(**tensors)
        flat = [result[k] for k in loaded.output_keys]
    return {
        o.name: np.asarray(t.numpy() if hasattr(t, "numpy") else t)
        for o, t in zip(loaded.outputs, flat, strict=True)
    }


def make_session(model: Any, serialized: bytes | None = None) -> tuple[Any, str]:
    """An onnxruntime CPU session for ``model`` and a description of the route taken.

    Graphs with ``bnexport::FusedNorm`` nodes go through the plugin's CPU path
    (``bnexport_plugins.fused_norm.ort_cpu.make_cpu_session``); others are plain
    onnxruntime sessions (2 threads, graph optimizations off).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    # the graph as written is what is verified (onnxruntime's own fusions could hide a
    # wrong fold); skipping them also makes the session ~2x faster to create
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if any(n.op_type == "FusedNorm" for n in model.graph.node):
        from bnexport_plugins.fused_norm.ort_cpu import make_cpu_session

        route = "onnxruntime + bnexport_plugins FusedNorm CPU"
        return make_cpu_session(model, sess_options=opts), route
    session = ort.InferenceSession(
        serialized or model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session, "onnxruntime"


def run_onnx(
    model: Any, feeds: dict[str, np.ndarray], serialized: bytes | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Run ``model`` with onnxruntime on ``feeds`` (cast to the graph's input dtypes).

    ``serialized`` is ``model.SerializeToString()`` when the caller already has it.
    """
    import onnx

    session, route = make_session(model, serialized)
    typed: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name not in feeds:
            continue
        np_type = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        typed[inp.name] = feeds[inp.name].astype(np_type)
    names = [o.name for o in model.graph.output]
    values = session.run(names, typed)
    return dict(zip(names, values, strict=True)), route


def compare(
    reference: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    *,
    rtol: float,
    atol: float,
    batch: int,
    runtime: str = "onnxruntime",
) -> VerifyResult:
    """Compare outputs; NaN/Inf where the reference is finite counts as an infinite error."""
    per_output: dict[str, dict[str, float]] = {}
    worst, worst_ratio = "", -1.0
    for name, ref in reference.items():
        ref64 = np.asarray(ref, np.float64)
        got = np.asarray(actual[name], np.float64)
        if got.shape != ref64.shape:
            raise VerificationError(
                f"output {name!r}: ONNX shape {got.shape} != model shape {ref64.shape}"
            )
        diff = np.abs(got - ref64)
        diff[~np.isfinite(got) & np.isfinite(ref64)] = np.inf
        err = float(np.max(diff)) if diff.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        tol = rtol * scale + atol
        per_output[name] = {"max_abs_error": err, "max_abs_ref": scale, "tolerance": tol}
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else np.inf)
        if ratio > worst_ratio:
            worst, worst_ratio = name, ratio
    top = per_output.get(worst, {"max_abs_error": 0.0, "tolerance": atol})
    return VerifyResult(
        passed=all(v["max_abs_error"] <= v["tolerance"] for v in per_output.values()),
        max_abs_error=max((v["max_abs_error"] for v in per_output.values()), default=0.0),
        tolerance=top["tolerance"],
        worst_output=worst,
        rtol=rtol,
        atol=atol,
        batch=batch,
        per_output=per_output,
        runtime=runtime,
    )


def verify(
    loaded: LoadedModel,
    model: Any,
    *,
    dtype: str,
    batch: int,
    seed: int = 0,
    serialized: bytes | None = None,
) -> VerifyResult:
    """Run both and compare (see module doc for inputs and tolerances).

    One batch of ``batch`` generated samples (the exporter uses 2: the smallest batch
    that still shows a batch dimension baked into the graph).

    Raises:
        VerificationError: an output differs beyond tolerance (names the worst output,
            its error and the tolerance).
    """
    rtol, atol = TOLERANCES[dtype]
    feeds = make_inputs(loaded.inputs, batch, seed)
    reference = run_reference(loaded, feeds)
    actual, route = run_onnx(model, feeds, serialized)
    result = compare(reference, actual, rtol=rtol, atol=atol, batch=batch, runtime=route)
    if not result.passed:
        worst = result.per_output[result.worst_output]
        raise VerificationError(
            f"exported graph disagrees with the model on output {result.worst_output!r}: "
            f"max abs error {worst['max_abs_error']:.4g} > tolerance {worst['tolerance']:.4g} "
            f"({rtol:g}·max|ref| {worst['max_abs_ref']:.4g} + {atol:g}, {dtype}, batch {batch})"
        )
    return result
