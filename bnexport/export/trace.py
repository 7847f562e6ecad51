"""Trace a model to a ``tf.function`` and convert it with tf2onnx, BNs kept identifiable.

How each batch normalization reaches ONNX
-----------------------------------------
While tracing, every BN layer's ``call`` is replaced (on the instance, restored in a
``finally``) by ``x · scale + shift`` where ``scale``/``shift`` are extra *placeholder*
inputs of the traced function, and the ops are named ``bnexport_bn<i>_mul`` /
``bnexport_bn<i>_add``. Placeholders keep TF's grappler from folding the product into
the convolution in float32 behind our back; after grappler ran, the placeholders are
replaced in the frozen GraphDef by constants holding the float64-computed values cast to
float32. tf2onnx then emits exactly one ``Mul``/``Add`` pair per BN, named after it.

tf2onnx's own optimizer would still merge such a ``Mul``/``Add`` into a bias-less
``Conv`` (transpose optimizer) and fold ``Conv``+``BatchNormalization`` (back-to-back
optimizer) in float32, losing the link to the layer. Both merges are switched off for
BN-derived nodes only; everything else tf2onnx optimizes as usual. The folding itself is
done by :mod:`bnexport.export.passes` in float64, which reports where each BN went.

Other conversion fixes
----------------------
* Keras 3 ``Sequential`` models: ``from_function`` with an explicit input signature
  (``from_keras`` fails with ``KeyError: 'keras_tensor_N'``).
* Grouped ``Conv1D``/``Conv2D`` (``groups > 1``): Keras 3 runs them through an XLA-compiled
  function that tf2onnx leaves as a ``StatefulPartitionedCall``. While tracing, their
  ``call`` emits a plain TF ``Conv2D`` whose filter has ``C_in / groups`` input channels
  (TF's graph op accepts that; only its CPU kernel lacks groups, and nothing is executed);
  tf2onnx converts it to one ONNX ``Conv`` with ``group = groups``.
* Every TF op created inside a layer's ``call`` is attributed to that layer, so an op tf2onnx
  cannot convert is reported with the layer's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from typing import Any

import numpy as np

from bnexport.errors import ExportError
from bnexport.export.bn_layers import BNLayer
from bnexport.export.loaders import LoadedModel
from bnexport.export.patches import BN_NODE_RE, TraceState, patched_layers
from bnexport.export.tf2onnx_compat import tf2onnx_optimizers
from bnexport.stage_timer import StageTimer

log = logging.getLogger(__name__)

_CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"  # tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS


def _param_name(index: int, which: str) -> str:
    return f"bnexport_bn{index}_{which}_param"


@dataclasses.dataclass
class TraceResult:
    """A converted (unfolded) ONNX model and what the tracing learned.

    Attributes:
        model: the ONNX model from tf2onnx (BNs as ``Mul``/``Add`` pairs or
            ``BatchNormalization`` nodes).
        bn_nodes: ``{onnx node name: BN layer name}`` for the BN-derived nodes.
        layer_tensors: ``{layer name: TF tensor name of its output}`` (``op:0``).
        layer_shapes: ``{layer name: output shape}`` as traced (batch ``None``).
        op_layers: ``{TF op name: layer name}`` for every op created inside a layer.
    """

    model: Any
    bn_nodes: dict[str, str]
    layer_tensors: dict[str, str]
    layer_shapes: dict[str, list[int | None]]
    op_layers: dict[str, str]


#: name of the dynamic batch dimension in the exported graph's inputs and outputs
BATCH_DIM = "batch"


def apply_input_shapes(
    loaded: LoadedModel, input_shapes: dict[str, Any], dynamic_batch: bool
) -> bool:
    """Replace the shapes of ``loaded.inputs`` by ``input_shapes`` (in place).

    Args:
        loaded: the loaded model; its ``inputs[i].shape`` are overwritten.
        input_shapes: ``{input name: shape}``; ``None`` (or ``-1``) in a shape keeps that
            dimension dynamic; key ``""`` means the only input.
        dynamic_batch: the caller's choice, returned unless the shapes fix the batch.

    Returns:
        The batch mode to export with: ``False`` when every input's first dimension is
        fixed by ``input_shapes`` (a static batch of that size), else ``dynamic_batch``.

    Raises:
        InputError: an unknown input name (the known ones are listed), a rank that
            differs from the model's, a fixed dimension the model fixes otherwise, or
            first dimensions fixed on some inputs only.
    """
    from bnexport.errors import InputError

    by_name = {info.name: info for info in loaded.inputs}
    shapes = dict(input_shapes)
    if "" in shapes:
        if len(loaded.inputs) != 1:
            raise InputError(
                f"input shape without a name, but the model has {len(loaded.inputs)} inputs "
                f"({', '.join(by_name)}); write NAME:shape"
            )
        shapes[loaded.inputs[0].name] = shapes.pop("")
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise InputError(
            f"input shape for unknown input(s) {', '.join(map(repr, unknown))}; "
            f"the model's inputs: {', '.join(f'{n}{list(i.shape)}' for n, i in by_name.items())}"
        )
    fixed_batch = []
    for name, raw in shapes.items():
        info = by_name[name]
        shape = [None if d is None or int(d) < 0 else int(d) for d in raw]
        if len(shape) != len(info.shape):
            raise InputError(
                f"input {name!r}: shape {list(raw)} has rank {len(shape)}, the model's "
                f"{list(info.shape)} has rank {len(info.shape)}"
            )
        for axis, (new, old) in enumerate(zip(shape, info.shape, strict=True)):
            if axis and new is not None and old is not None and new != old:
                raise InputError(
                    f"input {name!r}: dimension {axis} is {old} in the model, cannot be {new}"
                )
        info.shape = shape
        fixed_batch.append(bool(shape) and shape[0] is not None)
    if len(fixed_batch) != len(loaded.inputs):
        fixed_batch += [False] * (len(loaded.inputs) - len(fixed_batch))
    if all(fixed_batch):
        return False
    if any(fixed_batch):
        raise InputError(
            "input shapes fix the batch dimension of some inputs only; fix it on every "
            "input (a static batch) or on none (a dynamic batch)"
        )
    return dynamic_batch


def _name_batch_dims(model: Any) -> None:
    """Name the dynamic first dimension of every graph input and output :data:`BATCH_DIM`.

    tf2onnx names unknown dimensions ``unk__<n>`` (a different number on inputs and
    outputs); one name says they are the same batch, and reads well in Triton configs
    and ``onnxruntime``'s errors. Other dynamic dimensions keep their names.
    """
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def _tf_dtype(tf: Any, name: str) -> Any:
    return tf.as_dtype(name if name != "float" else "float32")


def _make_function(loaded: LoadedModel, n_bn: int, state: TraceState) -> Any:
    """The ``tf.function`` to trace: model inputs, then ``scale``/``shift`` per BN."""
    import tensorflow as tf

    n_in = len(loaded.inputs)
    out_names = [o.name for o in loaded.outputs]

    def fn(*args: Any) -> dict[str, Any]:
        feeds, params = args[:n_in], args[n_in:]
        state.params = {i: (params[2 * i], params[2 * i + 1]) for i in range(n_bn)}
        if loaded.is_keras:
            x = feeds[0] if n_in == 1 else list(feeds)
            result = loaded.model(x, training=False)
            flat = tf.nest.flatten(result)
        else:
            result = loaded.model(**dict(zip(loaded.signature_keys, feeds, strict=True)))
            flat = [result[k] for k in loaded.output_keys]
        if len(flat) != len(out_names):
            raise ExportError(
                f"model returned {len(flat)} outputs, expected {len(out_names)} ({out_names})"
            )
        return {name: tf.identity(t) for name, t in zip(out_names, flat, strict=True)}

    return tf.function(fn, autograph=False)


def _signature(loaded: LoadedModel, bns: list[BNLayer], dynamic_batch: bool) -> list[Any]:
    import tensorflow as tf

    specs = []
    for info in loaded.inputs:
        shape = list(info.shape)
        if shape:
            shape[0] = None if dynamic_batch else (shape[0] or 1)
        specs.append(tf.TensorSpec(shape, _tf_dtype(tf, info.dtype), name=info.name))
    for i, bn in enumerate(bns):
        for which in ("scale", "shift"):
            specs.append(
                tf.TensorSpec(list(bn.param_shape), tf.float32, name=_param_name(i, which))
            )
    return specs


def _bind_params(graph_def: Any, bns: list[BNLayer]) -> None:
    """Replace the BN placeholders in ``graph_def`` by float32 constants (in place)."""
    import tensorflow as tf

    values: dict[str, np.ndarray] = {}
    for i, bn in enumerate(bns):
        values[_param_name(i, "scale")] = bn.scale.astype(np.float32)
        values[_param_name(i, "shift")] = bn.shift.astype(np.float32)
    for node in graph_def.node:
        if node.op == "Placeholder" and node.name in values:
            value = values.pop(node.name)
            node.op = "Const"
            for key in list(node.attr.keys()):
                if key != "dtype":
                    del node.attr[key]
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))


def _freeze(concrete: Any, input_names: list[str], output_names: list[str]) -> Any:
    """The frozen, grappler-optimized ``GraphDef`` of ``concrete`` (variables as constants).

    What ``tf2onnx.tf_loader.from_function`` does, without its two costly detours: it
    rebuilds a ``ConcreteFunction`` from the frozen ``GraphDef`` only to serialize it again
    (``convert_variables_to_constants_v2`` → ``wrap_function``: a third of the freeze
    time), and it imports the graph into a session to drop resource inputs (ours has
    none: the inputs are the signature's tensors). Falls back to ``from_function`` when
    TensorFlow's converter is not where expected or hits the resource bug tf2onnx fixes.
    """
    import tensorflow as tf
    from tf2onnx import tf_loader

    try:
        from tensorflow.python.framework import convert_to_constants as c2c

        data = c2c._FunctionConverterDataInEager(  # noqa: SLF001
            func=concrete, lower_control_flow=False, aggressive_inlining=True
        )
        graph_def, _ = c2c._replace_variables_by_constants(converter_data=data)  # noqa: SLF001
    except (ImportError, AttributeError, TypeError):
        return tf_loader.from_function(concrete, input_names, output_names)
    except ValueError as exc:
        if "incompatible with expected resource" not in str(exc):
            raise
        return tf_loader.from_function(concrete, input_names, output_names)
    graph_def = tf_loader.fix_freezing_errors_part2(graph_def)
    with tf.Graph().as_default():  # grappler's meta-graph export needs graph mode
        return tf_loader.tf_optimize(input_names, output_names, graph_def)


def _unsupported_nodes(model: Any) -> list[Any]:
    import onnx

    bad = []
    for node in model.graph.node:
        domain = node.domain or ""
        if domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, ""):
            bad.append(node)
    return bad


def layer_of_op(op_name: str, op_layers: dict[str, str], layers: list[str]) -> str | None:
    """The layer that created TF op ``op_name`` (exact, then by name scope)."""
    base = op_name.split(":")[0]
    if base in op_layers:
        return op_layers[base]
    for candidate, layer in op_layers.items():  # ops renamed by tf2onnx: shared scope prefix
        scope = candidate.rsplit("/", 1)[0]
        if "/" in candidate and base.startswith(scope + "/"):
            return layer
    parts = [re.sub(r"_\d+$", "", p) for p in base.split("/")]
    for part in reversed(parts):
        if part in layers:
            return part
    return None


def trace_and_convert(
    loaded: LoadedModel,
    bns: list[BNLayer],
    *,
    opset: int,
    dynamic_batch: bool,
    timings: dict[str, float] | None = None,
) -> TraceResult:
    """Trace ``loaded`` with BN layers patched and convert the result with tf2onnx.

    Args:
        loaded: the model to convert.
        bns: its BN layers (empty for a SavedModel without Keras metadata).
        opset: ONNX default-domain opset.
        dynamic_batch: symbolic batch dimension if True, else batch 1 (or the model's).
        timings: if given, receives the seconds of ``trace`` (the ``tf.function``),
            ``freeze`` (variables to constants, grappler) and ``convert`` (tf2onnx).

    Returns:
        The unfolded ONNX model and the tracing metadata.

    Raises:
        ExportError: tracing failed, or tf2onnx could not convert an op (names its layer).
    """
    import tensorflow as tf
    from tf2onnx.convert import _convert_common, tensor_names_from_structed  # noqa: PLC2701

    timer = StageTimer(timings=timings)
    state = TraceState()
    function = _make_function(loaded, len(bns), state)
    specs = _signature(loaded, bns, dynamic_batch)
    context = (
        patched_layers(loaded.model, bns, state) if loaded.is_keras else contextlib.nullcontext()
    )
    try:
        with context:
            concrete = function.get_concrete_function(*specs)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - surface the layer TF was tracing
        raise ExportError(f"tracing the model failed: {type(exc).__name__}: {exc}") from exc

    # the signature's arguments come first; the rest are captures (variables, constants
    # held by layers such as Normalization), which freezing turns into constants
    input_names = [t.name for t in concrete.inputs[: len(specs)]]
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    param_names = {_param_name(i, w) for i in range(len(bns)) for w in ("scale", "shift")}
    renames = tensor_names_from_structed(concrete, input_names, output_names)
    renames = {k: v for k, v in renames.items() if k.split(":")[0] not in param_names}
    model_inputs = [n for n in input_names if n.split(":")[0] not in param_names]

    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.CRITICAL)  # unsupported ops are reported below, by layer
    # tf2onnx deep-copies the whole graph before each optimizer to undo a failing one and
    # carry on silently; we want failures raised (and no copy before each optimizer)
    catch_env = os.environ.get(_CATCH_ERRORS)
    os.environ[_CATCH_ERRORS] = "FALSE"
    timer.lap("trace")
    try:
        with tf.device("/cpu:0"):
            frozen = _freeze(concrete, input_names, output_names)
            _bind_params(frozen, bns)
            timer.lap("freeze")
            model, _ = _convert_common(
                frozen,
                name=getattr(loaded.model, "name", "model"),
                continue_on_error=True,
                opset=opset,
                input_names=model_inputs,
                output_names=output_names,
                tensors_to_rename=renames,
                optimizers=tf2onnx_optimizers(protect_all=not loaded.is_keras),
            )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the failing TF op's layer if we can
        raise ExportError(f"tf2onnx failed: {type(exc).__name__}: {exc}") from exc
    finally:
        timer.lap("convert")
        tf2onnx_log.setLevel(level)
        if catch_env is None:
            os.environ.pop(_CATCH_ERRORS, None)
        else:
            os.environ[_CATCH_ERRORS] = catch_env

    if dynamic_batch:
        _name_batch_dims(model)
    bad = _unsupported_nodes(model)
    if bad:
        layer_names = sorted(set(state.op_layers.values()))
        node = bad[0]
        layer = layer_of_op(node.name, state.op_layers, layer_names)
        where = f"layer {layer!r}" if layer else f"TF op {node.name!r}"
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ExportError(
            f"{where}: tf2onnx cannot convert TF op {node.op_type!r} ({node.name}){others}"
        )

    bn_nodes: dict[str, str] = {}
    for node in model.graph.node:
        match = BN_NODE_RE.search(node.name)
        if match and int(match.group(1)) < len(bns):
            bn_nodes[node.name] = bns[int(match.group(1))].name
    return TraceResult(
        model=model,
        bn_nodes=bn_nodes,
        layer_tensors=dict(state.layer_tensors),
        layer_shapes=dict(state.layer_shapes),
        op_layers=dict(state.op_layers),
    )
