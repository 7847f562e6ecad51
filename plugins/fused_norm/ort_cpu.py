"""Run graphs containing ``bnexport::FusedNorm`` on ONNX Runtime's CPU provider.

Two routes, chosen by :func:`make_cpu_session`:

* ``"extensions"`` (default when ``onnxruntime-extensions`` is installed): the
  NumPy reference itself runs as an onnxruntime-extensions Python op, so the CPU
  numbers are the reference's (bit-exact for float32; float16/bfloat16 are cast
  to float32 around the op, because the Python-op API has no 16-bit types, which
  can move a result by one unit in the last place). Python ops live in the domain
  ``ai.onnx.contrib`` with fixed input/output types, so a copy of the model is
  rewritten: each FusedNorm node becomes ``ai.onnx.contrib::BnexportFusedNorm1``
  (one output) or ``...3`` (with statistics), with Cast nodes around 16-bit X/Y.
* ``"lower"``: :func:`bnexport_plugins.fused_norm.lowering.lower_fused_norm`
  rewrites every node into standard ONNX ops (float32 math in ONNX Runtime).

An exception inside a Python op aborts the process in onnxruntime-extensions
0.15, so the op never raises: bad input (e.g. a dynamic batch that the ghost
size does not divide) is recorded, NaNs are returned, and the session returned
here raises the recorded ``PluginError`` from ``run``. Static shapes are checked
when the session is made (ONNX shape inference with the FusedNorm schema).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import onnx
from bnexport_plugins.fused_norm import spec
from bnexport_plugins.fused_norm.reference import fused_norm
from onnx import helper

CONTRIB_DOMAIN = "ai.onnx.contrib"
OP_ONE_OUTPUT = "BnexportFusedNorm1"
OP_THREE_OUTPUTS = "BnexportFusedNorm3"

_LOCK = threading.Lock()
_REGISTERED = False
_ERRORS: list[str] = []
_SIXTEEN_BIT = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _safe_call(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, nout: int, **attrs: Any):
    """Run the reference; on error record it and return NaNs (never raise into ORT)."""
    attrs.pop("plugin_namespace", None)
    attrs.pop("plugin_version", None)
    try:
        out = fused_norm(x, scale, shift, **attrs)
    except Exception as exc:  # noqa: BLE001 - re-raised from the session's run()
        with _LOCK:
            _ERRORS.append(f"{type(exc).__name__}: {exc}")
        y = np.full(x.shape, np.nan, np.float32)
        c = scale.shape[0] if scale.ndim == 1 else 1
        return (
            y if nout == 1 else (y, np.full(c, np.nan, np.float32), np.full(c, np.nan, np.float32))
        )
    if nout == 1:
        return np.asarray(out, np.float32)
    y, mean, var = out
    return np.asarray(y, np.float32), mean, var


def register_fused_norm_cpu() -> None:
    """Register the FusedNorm Python ops with onnxruntime-extensions (idempotent).

    Raises:
        BackendUnavailableError: onnxruntime-extensions is not installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as exc:
        from bnexport.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "FusedNorm on CPU via Python ops needs onnxruntime-extensions "
            "(pip install onnxruntime-extensions); or use backend='lower'"
        ) from exc
    kinds = {
        int: PyCustomOpDef.dt_int64,
        float: PyCustomOpDef.dt_float,
        str: PyCustomOpDef.dt_string,
    }
    attrs = {k: kinds[t] for k, t in spec.ATTRIBUTE_TYPES.items()}
    attrs["plugin_namespace"] = PyCustomOpDef.dt_string
    f32 = PyCustomOpDef.dt_float

    @onnx_op(op_type=OP_ONE_OUTPUT, inputs=[f32, f32, f32], outputs=[f32], attrs=attrs)
    def _one(x, scale, shift, **kw):  # noqa: ANN001, ANN202
        return _safe_call(x, scale, shift, 1, **kw)

    @onnx_op(op_type=OP_THREE_OUTPUTS, inputs=[f32, f32, f32], outputs=[f32, f32, f32], attrs=attrs)
    def _three(x, scale, shift, **kw):  # noqa: ANN001, ANN202
        return _safe_call(x, scale, shift, 3, **kw)

    _REGISTERED = True


def _load(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model
    from bnexport.io.onnx_file import load_onnx

    return load_onnx(model_or_path)  # ModelFileError naming the file, external data confined


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed value, after shape inference with the FusedNorm schema."""
    from bnexport_plugins.fused_norm.onnx_node import register_onnx_schema

    register_onnx_schema()
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def to_python_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite (in place) FusedNorm nodes into onnxruntime-extensions Python ops; returns ``model``.

    Raises:
        PluginError: a node with bad attributes or static shapes (via shape inference).
    """
    from bnexport.errors import PluginError

    try:
        types = _elem_types(model)
    except onnx.shape_inference.InferenceError as exc:
        raise PluginError(str(exc)) from None
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not spec.is_fused_norm(node):
            new_nodes.append(node)
            continue
        name = node.name or node.output[0]
        elem = types.get(node.input[0], onnx.TensorProto.FLOAT)
        outputs = [o for o in node.output]
        if len([o for o in outputs if o]) not in (1, 3):
            raise PluginError(f"FusedNorm node {name!r}: needs 1 or 3 outputs. Received: {outputs}")
        op = OP_ONE_OUTPUT if len(outputs) == 1 else OP_THREE_OUTPUTS
        x_in, y_out = node.input[0], outputs[0]
        if elem in _SIXTEEN_BIT:
            x_in, y_out = f"{name}__x_f32", f"{name}__y_f32"
            new_nodes.append(
                helper.make_node(
                    "Cast",
                    [node.input[0]],
                    [x_in],
                    to=onnx.TensorProto.FLOAT,
                    name=f"{name}__cast_x",
                )
            )
        attrs = {**spec.ATTRIBUTE_DEFAULTS, "plugin_namespace": spec.PLUGIN_NAMESPACE}
        attrs.update({a.name: helper.get_attribute_value(a) for a in node.attribute})
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        attrs.pop("plugin_version", None)
        new_nodes.append(
            helper.make_node(
                op,
                [x_in, *node.input[1:]],
                [y_out, *outputs[1:]],
                name=name,
                domain=CONTRIB_DOMAIN,
                **attrs,
            )
        )
        if elem in _SIXTEEN_BIT:
            new_nodes.append(
                helper.make_node("Cast", [y_out], [outputs[0]], to=elem, name=f"{name}__cast_y")
            )
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_operatorsetid(CONTRIB_DOMAIN, 1))
    return model


class _CheckedSessionMixin:
    """Raises the error a FusedNorm Python op recorded during ``run``."""

    def run(self, output_names, input_feed, run_options=None):  # noqa: D102
        with _LOCK:
            _ERRORS.clear()
        result = super().run(output_names, input_feed, run_options)
        with _LOCK:
            errors = list(_ERRORS)
            _ERRORS.clear()
        if errors:
            from bnexport.errors import PluginError

            raise PluginError(errors[0])
        return result


def make_cpu_session(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    backend: str = "auto",
    **ort_kwargs: Any,
):
    """An ``onnxruntime.InferenceSession`` (CPU) for a model that may contain FusedNorm nodes.

    Args:
        model_or_path: ``ModelProto`` (not modified) or path to an ``.onnx`` file.
        backend: ``"extensions"`` (reference numbers via Python ops), ``"lower"``
            (standard ONNX ops) or ``"auto"`` (extensions if installed, else lower).
        **ort_kwargs: Passed to ``InferenceSession`` (e.g. ``sess_options``);
            ``providers`` defaults to ``["CPUExecutionProvider"]``.

    Raises:
        PluginError: a FusedNorm node with bad attributes or static shapes.
        BackendUnavailableError: ``backend="extensions"`` without onnxruntime-extensions.
    """
    import onnxruntime as ort

    from bnexport.errors import UsageError

    if backend not in ("auto", "extensions", "lower"):
        raise UsageError(
            f"make_cpu_session: backend must be auto, extensions or lower. Received: {backend!r}"
        )
    model = _load(model_or_path)
    ort_kwargs.setdefault("providers", ["CPUExecutionProvider"])
    if not spec.has_fused_norm(model):
        return ort.InferenceSession(model.SerializeToString(), **ort_kwargs)
    if backend == "auto":
        try:
            import onnxruntime_extensions  # noqa: F401

            backend = "extensions"
        except ImportError:
            backend = "lower"
    if backend == "lower":
        from bnexport_plugins.fused_norm.lowering import lower_fused_norm

        return ort.InferenceSession(lower_fused_norm(model).SerializeToString(), **ort_kwargs)
    register_fused_norm_cpu()
    from onnxruntime_extensions import get_library_path

    model = to_python_ops(model)
    so = ort_kwargs.pop("sess_options", None) or ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    cls = type("FusedNormCPUSession", (_CheckedSessionMixin, ort.InferenceSession), {})
    return cls(model.SerializeToString(), sess_options=so, **ort_kwargs)
