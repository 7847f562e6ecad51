"""Check that the exported graph computes what the source model does.

The source model runs in inference mode (``training=False``) on its own Keras backend
(TensorFlow, JAX or torch: nothing here imports TensorFlow unless the source is a
SavedModel, which only TensorFlow can run), the ONNX graph in onnxruntime through the
project's one session maker, :func:`bnexport.runtime.ort_session.make_session` (graphs with
``bnexport::FusedNorm`` nodes through the plugin's CPU path), both on the same generated
inputs. The pass criterion and its defaults are the project's one tolerance policy,
:mod:`bnexport.tolerance` (the parity checker applies the same): every element of every
output must satisfy ``|onnx − ref| <= atol + rtol·|ref| + range_rtol·max|ref|`` (``max|ref|``
per output channel), float32 ``rtol = atol = 1e-4``, ``range_rtol = 1e-5``; float16 ``2e-2``,
``1e-3``. The inputs come from :func:`bnexport.sample_inputs.make_inputs` (seeded;
rank-4 floats as images in ``[-1, 1)``, other floats standard normal, integers in
``[0, 10)``; dynamic non-batch dimensions become 8).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnexport import tolerance
from bnexport.errors import VerificationError
from bnexport.export.loaders import KIND_KERAS, LoadedModel
from bnexport.export.report import VerifyResult
from bnexport.sample_inputs import make_inputs

#: ``dtype -> (rtol, atol)``, read from :mod:`bnexport.tolerance` (looked up per call)
TOLERANCES: dict[str, tuple[float, float]] = {
    dtype: tolerance.default_tolerances(dtype) for dtype in ("float32", "float16")
}
#: size given to dynamic non-batch input dimensions
DYNAMIC_DIM = 8


def _flatten(result: Any) -> list[Any]:
    """The leaves of a model's output structure, in ``model.outputs`` order.

    A tensor is one leaf; lists and tuples are walked in order, dicts by sorted key
    (the order ``tf.nest`` and ``keras.tree`` use), so no framework is needed for it.
    """
    if isinstance(result, list | tuple):
        return [leaf for item in result for leaf in _flatten(item)]
    if isinstance(result, dict):
        return [leaf for key in sorted(result) for leaf in _flatten(result[key])]
    return [result]


def _to_numpy(tensor: Any, keras3: bool) -> np.ndarray:
    """``tensor`` as a NumPy array, whatever the backend produced it.

    Keras 3 converts its own backend's tensors (a torch tensor that requires grad, a JAX
    array on a device); tf.keras and SavedModel outputs are TensorFlow tensors.
    """
    if isinstance(tensor, np.ndarray):  # the NumPy backend
        return tensor
    if keras3:
        from keras import ops

        return np.asarray(ops.convert_to_numpy(tensor))
    return np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)


def run_reference(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the source model in inference mode; ``{output name: array}``.

    A Keras model runs on its own backend (no TensorFlow import on JAX or torch); a
    SavedModel's serving function needs TensorFlow.
    """
    args = [feeds[i.name] for i in loaded.inputs]
    if loaded.is_keras:
        result = loaded.model(args[0] if len(args) == 1 else args, training=False)
        flat = _flatten(result)
    else:
        import tensorflow as tf

        tensors = {k: tf.constant(a) for k, a in zip(loaded.signature_keys, args, strict=True)}
        result = loaded.model(**tensors)
        flat = [result[k] for k in loaded.output_keys]
    keras3 = loaded.kind == KIND_KERAS
    return {o.name: _to_numpy(t, keras3) for o, t in zip(loaded.outputs, flat, strict=True)}


def run_onnx(
    model: Any, feeds: dict[str, np.ndarray], serialized: bytes | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Run ``model`` with onnxruntime on ``feeds`` (cast to the graph's input dtypes).

    The session is :func:`bnexport.runtime.ort_session.make_session`'s (2 threads, default
    graph optimizations; FusedNorm graphs through the plugin's CPU path). Returns the
    outputs and a description of the route taken. ``serialized`` is
    ``model.SerializeToString()`` when the caller already has it.
    """
    import onnx
    from bnexport_plugins.fused_norm.spec import has_fused_norm

    from bnexport.runtime.ort_session import make_session

    session = make_session(serialized if serialized is not None else model, threads=2)
    route = "onnxruntime"
    if has_fused_norm(model):
        route = "onnxruntime + bnexport_plugins FusedNorm CPU"
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
    range_rtol: float = 0.0,
) -> VerifyResult:
    """Compare outputs elementwise (:mod:`bnexport.tolerance`); NaN/Inf fails.

    ``per_output[o]["tolerance"]`` is ``atol + rtol·|ref| + range_rtol·max|ref|`` at the
    element of ``o`` whose error is largest relative to its bound, ``"worst_abs_error"``
    that element's error.
    """
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
        bad = tolerance.violations(ref64, got, rtol, atol, range_rtol)
        err = float(np.max(diff)) if diff.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        bound = tolerance.bounds(ref64, rtol, atol, range_rtol)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(bound > 0, diff / bound, np.where(diff == 0, 0.0, np.inf))
        worst_at = int(np.nanargmax(ratios)) if ratios.size else 0
        tol = float(bound.reshape(-1)[worst_at]) if bound.size else atol
        ratio = float(ratios.reshape(-1)[worst_at]) if ratios.size else 0.0
        per_output[name] = {
            "max_abs_error": err,
            "max_abs_ref": scale,
            "tolerance": tol,
            "worst_abs_error": float(diff.reshape(-1)[worst_at]) if diff.size else 0.0,
            "violations": float(np.count_nonzero(bad)),
        }
        if ratio > worst_ratio:
            worst, worst_ratio = name, ratio
    top = per_output.get(worst, {"max_abs_error": 0.0, "tolerance": atol})
    return VerifyResult(
        passed=all(v["violations"] == 0 for v in per_output.values()),
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
    rtol: float | None = None,
    atol: float | None = None,
    range_rtol: float | None = None,
) -> VerifyResult:
    """Run both and compare (see module doc for inputs and tolerances).

    ``rtol``/``atol``/``range_rtol`` override the dtype's defaults from
    :mod:`bnexport.tolerance` (e.g. for a deep model whose large activations carry
    float32 reordering errors above the default range term).

    One batch of ``batch`` generated samples (the exporter uses 2: the smallest batch
    that still shows a batch dimension baked into the graph).

    Raises:
        VerificationError: an output differs beyond tolerance (names the worst output,
            its error and the tolerance).
    """
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    range_rtol = tolerance.default_range_rtol(dtype) if range_rtol is None else range_rtol
    feeds = make_inputs(loaded.inputs, batch, seed, fill_dynamic=DYNAMIC_DIM)
    reference = run_reference(loaded, feeds)
    actual, route = run_onnx(model, feeds, serialized)
    result = compare(
        reference,
        actual,
        rtol=rtol,
        atol=atol,
        batch=batch,
        runtime=route,
        range_rtol=range_rtol,
    )
    if not result.passed:
        worst = result.per_output[result.worst_output]
        raise VerificationError(
            f"exported graph disagrees with the model on output {result.worst_output!r}: "
            f"{int(worst['violations'])} element(s) exceed atol + rtol·|ref| + "
            "range_rtol·max|ref| "
            f"(max abs error {worst['max_abs_error']:.4g}; worst element: error "
            f"{worst['worst_abs_error']:.4g} > tolerance {worst['tolerance']:.4g}; "
            f"max|ref| {worst['max_abs_ref']:.4g}, rtol {rtol:g}, atol {atol:g}, "
            f"range_rtol {range_rtol:g}, {dtype}, batch {batch}; loosen with "
            "--rtol/--atol/--range-rtol or skip with --no-verify)"
        )
    return result
