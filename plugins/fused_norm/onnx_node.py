"""The ``bnexport::FusedNorm`` ONNX node: construction, schema, type and shape inference.

:func:`make_node` writes the node exactly as TensorRT's ONNX parser needs it
(every plugin attribute present, ``plugin_namespace`` set, one output or three).
:func:`register_onnx_schema` registers an ``onnx.defs.OpSchema`` for
``bnexport::FusedNorm`` (opset 1) with a type/shape-inference function, so
``onnx.checker.check_model(model, full_check=True)`` and
``onnx.shape_inference.infer_shapes`` accept and type exported graphs; it is
idempotent and must be called before either. Inference validates what is known
statically (dtype, rank, axis, scale/shift length, ghost size) and raises
``onnx.shape_inference.InferenceError`` carrying the ``PluginError`` message.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from bnexport_plugins.fused_norm import spec
from onnx import helper

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}
_REGISTERED = False


def make_node(
    inputs: Sequence[str],
    outputs: Sequence[str],
    name: str | None = None,
    **attrs: int | float | str,
) -> onnx.NodeProto:
    """Build a FusedNorm node with every attribute written (defaults filled in).

    Args:
        inputs: ``[X, scale, shift]`` tensor names.
        outputs: ``[Y]``, or ``[Y, batch_mean, batch_var]`` when ``return_stats=1``.
        name: Node name.
        **attrs: Attribute overrides (see ``spec.ATTRIBUTE_DEFAULTS``).

    Raises:
        PluginError: invalid attributes, or an input/output count that does not match.
    """
    from bnexport.errors import PluginError

    full = spec.node_attributes(**attrs)
    if len(inputs) != 3:
        raise PluginError(
            f"FusedNorm node {name!r}: needs inputs [X, scale, shift]. Received: {list(inputs)}"
        )
    want = spec.num_outputs(full)
    if len(outputs) != want or any(not o for o in outputs):
        raise PluginError(
            f"FusedNorm node {name!r}: return_stats={full['return_stats']} needs {want} named "
            f"output(s). Received: {list(outputs)}"
        )
    return helper.make_node(
        spec.OP_TYPE, list(inputs), list(outputs), name=name, domain=spec.DOMAIN, **full
    )


def opset_import() -> onnx.OperatorSetIdProto:
    """The ``opset_import`` entry a model containing FusedNorm nodes needs."""
    return helper.make_operatorsetid(spec.DOMAIN, spec.OPSET_VERSION)


def _attr_value(ctx, name: str):
    proto = ctx.get_attribute(name)
    if proto is None:
        return None
    return helper.get_attribute_value(proto)


def _dims(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    """Static dims (int), symbolic (str) or unknown (None); None if the rank is unknown."""
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _tensor_type(elem_type: int, dims: list[int | str | None] | None) -> onnx.TypeProto:
    if dims is None:
        return helper.make_tensor_type_proto(elem_type, None)
    return helper.make_tensor_type_proto(elem_type, dims)


def _infer(ctx) -> None:
    """Type/shape inference (and static validation) of one FusedNorm node."""
    from bnexport_plugins.fused_norm.checks import check_inputs

    from bnexport.errors import PluginError

    attrs = {}
    for key in spec.ATTRIBUTE_DEFAULTS:
        value = _attr_value(ctx, key)
        attrs[key] = spec.ATTRIBUTE_DEFAULTS[key] if value is None else value
    try:
        attrs = spec.validate_attributes(attrs)
        x_type = ctx.get_input_type(0)
        elem = x_type.tensor_type.elem_type
        if elem and elem not in _ONNX_DTYPES:
            raise PluginError(
                f"FusedNorm: unsupported dtype of X; expected one of {spec.DTYPES}. "
                f"Received: {onnx.TensorProto.DataType.Name(elem)}"
            )
        x_dims = _dims(x_type)
        # validate with what is known: unknown dims stand in as 1 (divides anything)
        if x_dims is not None:
            known = [d if isinstance(d, int) else 1 for d in x_dims]
            axis = int(attrs["axis"])
            if 0 <= axis < len(x_dims) and not isinstance(x_dims[axis], int):
                known[axis] = -1  # channel count unknown: skip the scale/shift check
            if x_dims and not isinstance(x_dims[0], int) and attrs["virtual_batch_size"]:
                known[0] = int(attrs["virtual_batch_size"])
            check_shape = [max(k, 1) for k in known]
            scale_dims = _dims(ctx.get_input_type(1)) if ctx.get_num_inputs() > 1 else None
            shift_dims = _dims(ctx.get_input_type(2)) if ctx.get_num_inputs() > 2 else None
            c = known[axis] if 0 <= axis < len(known) else 1
            sc = _param_shape(scale_dims, c)
            sh = _param_shape(shift_dims, c)
            check_shape_c = list(check_shape)
            if 0 <= axis < len(known) and c < 0:
                check_shape_c[axis] = 1
                sc, sh = (1,), (1,)
            check_inputs(check_shape_c, _ONNX_DTYPES.get(elem, "float32"), sc, sh, attrs)
    except PluginError as exc:
        raise onnx.shape_inference.InferenceError(f"[bnexport] {exc}") from None

    ctx.set_output_type(0, _tensor_type(elem, x_dims))
    if ctx.get_num_outputs() >= 3:
        stats_dims: list[int | str | None] | None = None
        if x_dims is not None:
            axis = int(attrs["axis"])
            c_dim = x_dims[axis]
            if int(attrs["virtual_batch_size"]) == 0:
                stats_dims = [c_dim]
            else:
                n = x_dims[0]
                g = n // int(attrs["virtual_batch_size"]) if isinstance(n, int) else None
                stats_dims = [g, c_dim]
        for i in (1, 2):
            ctx.set_output_type(i, _tensor_type(onnx.TensorProto.FLOAT, stats_dims))


def _param_shape(dims: list | None, channels: int) -> tuple[int, ...]:
    """Shape of scale/shift for the check (unknown dims assumed to match ``channels``)."""
    if dims is None:
        return (max(channels, 1),)
    return tuple(d if isinstance(d, int) else max(channels, 1) for d in dims)


def build_schema() -> onnx.defs.OpSchema:
    """The ``OpSchema`` of ``bnexport::FusedNorm`` (opset 1)."""
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    attr_types = {int: AT.INT, float: AT.FLOAT, str: AT.STRING}
    attributes = [
        A(
            key,
            attr_types[spec.ATTRIBUTE_TYPES[key]],
            f"See bnexport_plugins.fused_norm.spec ({key}).",
            required=False,
        )
        for key in spec.ATTRIBUTE_DEFAULTS
    ]
    attributes += [
        A("plugin_namespace", AT.STRING, "TensorRT plugin namespace.", required=False),
        A("plugin_version", AT.STRING, "TensorRT plugin version.", required=False),
    ]
    schema = onnx.defs.OpSchema(
        spec.OP_TYPE,
        spec.DOMAIN,
        spec.OPSET_VERSION,
        (spec.__doc__ or "").split("\n\n")[1],
        inputs=[P("X", "T", "input"), P("scale", "P", "[C] scale"), P("shift", "P", "[C] shift")],
        outputs=[
            P("Y", "T", "output, shape and dtype of X"),
            P("batch_mean", "P", "batch mean", param_option=opt),
            P("batch_var", "P", "biased batch variance", param_option=opt),
        ],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("P", ["tensor(float)"], "parameters and statistics"),
        ],
        attributes=attributes,
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_onnx_schema() -> None:
    """Register the FusedNorm schema with ``onnx.defs`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED or onnx.defs.has(spec.OP_TYPE, spec.DOMAIN):
        _REGISTERED = True
        return
    onnx.defs.register_schema(build_schema())
    _REGISTERED = True
