"""Q/DQ insertion on a folded float32 graph with ``onnxruntime.quantization``.

The graph that comes out is the one both onnxruntime and TensorRT's explicit quantization
take (what :func:`qdq_settings` asks ``quantize_static`` for):

- ``QuantFormat.QDQ``: ``QuantizeLinear``/``DequantizeLinear`` pairs around float ops;
- Q/DQ on the inputs (and outputs) of ``Conv``/``ConvTranspose``/``Gemm``/``MatMul`` only
  (``op_types_to_quantize``); everything else runs in float between them;
- weights: int8, **symmetric** (zero point 0), per output channel by default
  (``Conv`` axis 0, ``ConvTranspose`` axis 1, ``Gemm`` axis 0 with ``transB`` else 1,
  ``MatMul`` axis 1), scale ``s_c = max|W_c| / 127``, stored as int8 initializers
  (``target="cpu"``: ``s_c = max|W_c| / 64``, 7-bit weights, see :class:`QdqOptions`);
- activations: int8, **symmetric** per-tensor (``ActivationSymmetric``: zero point 0,
  ``s = max(|rmin|, |rmax|) / 127`` over the calibrated range) — TensorRT accepts only
  zero point 0;
- bias stays float (``QuantizeBias=False``): TensorRT refuses an int32
  ``DequantizeLinear`` ("only activation types allowed as input"), and onnxruntime's CPU
  optimizer quantizes a float bias itself when it fuses ``DQ → Conv → Q`` into
  ``QLinearConv`` (so the int8 kernels still run);
- one ``QuantizeLinear → DequantizeLinear`` pair per consumer of a quantized activation
  (:func:`split_shared_activations`): on x86, onnxruntime runs int8 activations by
  converting each int8 Q→DQ pair to uint8 (zero point 128), which it does only for a Q
  with exactly one DQ consumer; a tensor read by two nodes (a ResNet block input read by
  its first conv and by the residual Add) would otherwise leave that conv in float32
  (``benchmarks/quantize_bench.py`` reports how many nodes run in int8).

Calibration (``method``): ``minmax`` (the observed range), ``entropy`` (KL-divergence
threshold, TensorRT's classic calibrator) or ``percentile`` (``percentile`` of ``|x|``,
default 99.999). Calibrated ranges are cached in a JSON file so that quantizing again with
another exclusion list (the auto-exclude search) does not calibrate again.

:func:`qdq_summary` reads a QDQ graph back and checks these properties.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bnexport.errors import QuantizeError

Method = Literal["minmax", "entropy", "percentile"]
METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
TARGETS: tuple[str, ...] = ("tensorrt", "cpu")
#: op types that get Q/DQ on their inputs (and outputs)
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: per-channel weight axis by op type (Gemm depends on transB, see the module docstring)
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}


@dataclasses.dataclass(frozen=True)
class QdqOptions:
    """What to ask ``quantize_static`` for (validated by :meth:`check`).

    Attributes:
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        per_channel: per-output-channel weight scales (else one scale per weight tensor).
        op_types: op types whose inputs get Q/DQ.
        percentile: the percentile of ``|x|`` kept by ``method="percentile"``.
        target: ``"tensorrt"`` (default): symmetric int8 activations, zero point 0 — what
            TensorRT's explicit quantization needs; onnxruntime runs it too, but its x86
            int8 kernels saturate on it on CPUs without VNNI (see
            :mod:`bnexport.runtime.int8_kernels`). ``"cpu"``: asymmetric uint8 activations
            and 7-bit weights (``reduce_range``: int8 in ``[−64, 64]``), so that no
            ``vpmaddubsw`` pair sum can leave int16 on any x86 CPU (``255·64·2 ≤ 32767``);
            a ``Relu``/``Clip`` before a ``QuantizeLinear`` whose zero point is the range
            minimum is dropped, so more of the graph stays in int8. TensorRT refuses
            uint8 Q/DQ, and the report says so.
        full_range_weights: ``target="cpu"`` only: 8-bit weights (``[−127, 127]``): one
            more bit of weight precision, correct only on CPUs with VNNI/AVX-VNNI/AMX.
    """

    method: str = "minmax"
    per_channel: bool = True
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    percentile: float = 99.999
    target: str = "tensorrt"
    full_range_weights: bool = False

    @property
    def reduce_range(self) -> bool:
        """7-bit weights: ``target="cpu"`` unless ``full_range_weights``."""
        return self.target == "cpu" and not self.full_range_weights

    def check(self) -> None:
        """Raise :class:`QuantizeError` naming every invalid field."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}. Received: method={self.method!r}")
        if not isinstance(self.per_channel, bool):
            problems.append(f"per_channel must be a bool. Received: {self.per_channel!r}")
        if not self.op_types or not all(isinstance(t, str) for t in self.op_types):
            problems.append(f"op_types must be op type names. Received: {self.op_types!r}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {TARGETS}. Received: target={self.target!r}")
        if not isinstance(self.full_range_weights, bool):
            problems.append(
                f"full_range_weights must be a bool. Received: {self.full_range_weights!r}"
            )
        elif self.full_range_weights and self.target != "cpu":
            problems.append(
                "full_range_weights applies to target='cpu' (target='tensorrt' weights are "
                f"always 8-bit). Received: target={self.target!r}"
            )
        if not 50.0 < float(self.percentile) <= 100.0:
            problems.append(f"percentile must be in (50, 100]. Received: {self.percentile!r}")
        if problems:
            raise QuantizeError("; ".join(problems))


def extra_options(options: QdqOptions) -> dict[str, Any]:
    """The ``extra_options`` of ``quantize_static`` for ``options`` (see the module docstring)."""
    tensorrt = options.target == "tensorrt"
    extra: dict[str, Any] = {
        "ActivationSymmetric": tensorrt,
        "WeightSymmetric": True,
        "QuantizeBias": not tensorrt,
        "CalibTensorRangeSymmetric": options.method == "percentile",
    }
    # No CalibMaxIntermediateOutputs: MinMax keeps only per-batch ReduceMin/ReduceMax
    # outputs (small), and onnxruntime 1.32 drops (does not merge) the batches it clears.
    if options.method == "percentile":
        extra["CalibPercentile"] = float(options.percentile)
    return extra


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """Silence onnxruntime.quantization's root-logger warnings (pre-processing hints)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def preprocess(model: Any, workdir: Path) -> Path:
    """``quant_pre_process`` on ``model`` (shape inference only); return the file it wrote.

    onnxruntime's graph optimizer is skipped: bnexport's fold pass has already folded
    every BN it can (and says so in the report); a second optimizer would rename nodes
    that the caller's ``exclude`` list and the per-layer metadata refer to.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = workdir / "folded.onnx"
    onnx.save_model(model, str(src))
    dst = workdir / "prepared.onnx"
    try:
        with _quiet_ort_logging():
            quant_pre_process(str(src), str(dst), skip_optimization=True)
    except Exception:  # noqa: BLE001 - symbolic shape inference is best effort
        with _quiet_ort_logging():
            quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=True)
    return dst


def run_quantize_static(
    prepared: Path,
    make_reader: Any,
    options: QdqOptions,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    cache: Path,
    workdir: Path,
) -> Any:
    """Quantize the prepared model; return the QDQ ``onnx.ModelProto``.

    Args:
        prepared: the output of :func:`preprocess`.
        make_reader: ``() -> CalibrationDataReader``, called when the ranges are not
            cached yet (or onnxruntime has no ``calibration_cache_path``: every call
            then calibrates).
        options: the :class:`QdqOptions`.
        exclude: node names kept in float.
        only: quantize only these nodes (``None``: every node of ``options.op_types``).
        cache: the JSON calibration cache (written on first use, then read; needs
            onnxruntime's ``quantize_static(calibration_cache_path=...)``).
        workdir: a scratch folder.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.method]
    with tempfile.NamedTemporaryFile(dir=workdir, suffix=".onnx", delete=False) as handle:
        out = Path(handle.name)
    cache_kwargs: dict[str, Any] = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        cache_kwargs["calibration_cache_path"] = str(cache)
    reader = None if cache_kwargs and cache.is_file() else make_reader()
    with _quiet_ort_logging():
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types),
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QInt8 if options.target == "tensorrt" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(only) if only is not None else None,
            nodes_to_exclude=list(exclude),
            calibrate_method=method,
            extra_options=extra_options(options),
            **cache_kwargs,
        )
    model = onnx.load_model(str(out))
    out.unlink()
    if options.target == "tensorrt":  # uint8 pairs need no int8 -> uint8 conversion
        split_shared_activations(model)
    return model


def split_shared_activations(model: Any) -> int:
    """Give every consumer of a quantized activation its own Q→DQ pair; return how many added.

    ``x → Q(s) → DQ(s) → {A, B}`` becomes ``x → Q(s) → DQ(s) → A`` and
    ``x → Q(s') → DQ(s') → B``. onnxruntime's optimizer merges identical nodes and
    identical scalar initializers (common-subexpression elimination, constant sharing),
    which would rebuild the shared pair; so the ``k``-th extra pair gets the scale
    ``s' = nextafter^k(s)``, ``k`` float32 ulps above ``s`` (a relative change of
    ``k · 6e-8``, far below int8 resolution ``1/127``). Zero points stay 0; the values of
    every tensor stay within one int8 step of the shared pair's.

    A quantized op's own output is split too (MobileNetV2's projection convs feed a
    residual Add and the next block), so every conv of a residual network can take
    onnxruntime's int8 kernels.
    """
    from onnx import numpy_helper

    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    extra_after: dict[int, list[Any]] = {}
    added = 0
    for position, q in enumerate(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in init or len(q.input) < 3:
            continue
        dqs = [node for node, _ in consumers.get(q.output[0], [])]
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs):
            continue
        uses = [(dq, node, i) for dq in dqs for node, i in consumers.get(dq.output[0], [])]
        if len(uses) < 2 or q.input[1] not in init:
            continue
        scale = numpy_helper.to_array(init[q.input[1]])
        new_nodes = []
        for k, (dq, node, index) in enumerate(uses[1:], start=1):
            nudged = scale.copy()
            for _ in range(k):
                nudged = np.nextafter(nudged, np.asarray(np.inf, nudged.dtype))
            scale_name = f"{q.input[1]}_c{k}"
            graph.initializer.append(numpy_helper.from_array(nudged, scale_name))
            q2, dq2 = copy.deepcopy(q), copy.deepcopy(dq)
            q2.name, q2.output[0] = f"{q.name}_c{k}", f"{q.output[0]}_c{k}"
            q2.input[1] = scale_name
            dq2.name, dq2.output[0] = f"{dq.name}_c{k}", f"{dq.output[0]}_c{k}"
            dq2.input[0], dq2.input[1] = q2.output[0], scale_name
            node.input[index] = dq2.output[0]
            new_nodes += [q2, dq2]
            added += 1
        extra_after[position] = new_nodes
    if not added:
        return 0
    ordered = []
    for position, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(extra_after.get(position, []))
    for op in ("DequantizeLinear", "QuantizeLinear"):  # drop pairs left without a consumer
        used = {name for node in ordered for name in node.input} | outputs
        ordered = [n for n in ordered if n.op_type != op or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(ordered)
    return added


@dataclasses.dataclass
class QdqSummary:
    """What a QDQ graph contains, read back from the graph.

    Attributes:
        quantized_nodes: ``{node name: op type}`` of nodes whose data input and weight
            both come from ``DequantizeLinear``.
        float_nodes: nodes of the quantizable op types left in float (excluded, or no
            constant weight), ``{name: op type}``.
        weights: ``{weight tensor: {"dtype", "axis", "channels", "zero_points_zero"}}``.
        all_zero_points_zero: every Q/DQ node (weights and activations) has zero point 0.
        int8_only: every Q/DQ tensor is int8 (no int32 bias, no uint8).
        problems: why the graph is not TensorRT-explicit-quantization friendly (empty: it is).
    """

    quantized_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    float_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    weights: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    all_zero_points_zero: bool = True
    int8_only: bool = True
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def tensorrt_ready(self) -> bool:
        """Symmetric int8 everywhere, constant int8 weights, no int32 bias."""
        return not self.problems


def _weight_axis(node: Any) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return _WEIGHT_AXIS.get(node.op_type, 0)


def qdq_summary(model: Any, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> QdqSummary:
    """Read the Q/DQ structure of ``model`` and check it (see :class:`QdqSummary`)."""
    from onnx import TensorProto, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    summary = QdqSummary()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = init.get(node.input[2])
            if zp is not None and zp.data_type != TensorProto.INT8:
                summary.int8_only = False
                summary.problems.append(
                    f"{node.op_type} {node.name!r}: {TensorProto.DataType.Name(zp.data_type)} "
                    "quantization (TensorRT needs int8)"
                )
            if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
                summary.all_zero_points_zero = False
                summary.problems.append(f"{node.op_type} {node.name!r}: zero point is not 0")
        if node.op_type not in op_types:
            continue
        dq = [producer.get(name) for name in node.input[:2]]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in dq):
            summary.float_nodes[node.name] = node.op_type
            continue
        summary.quantized_nodes[node.name] = node.op_type
        weight_dq = dq[1]
        q_weight = init.get(weight_dq.input[0])
        if q_weight is None:  # an activation x activation MatMul
            continue
        scale = numpy_helper.to_array(init[weight_dq.input[1]])
        zero = numpy_helper.to_array(init[weight_dq.input[2]]) if len(weight_dq.input) > 2 else 0
        axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
        channels = int(scale.size)
        record = {
            "dtype": TensorProto.DataType.Name(q_weight.data_type).lower(),
            "axis": axis if channels > 1 else None,
            "channels": channels,
            "zero_points_zero": bool(np.all(zero == 0)),
        }
        summary.weights[weight_dq.input[0]] = record
        want = _weight_axis(node)
        if channels > 1 and (axis != want or q_weight.dims[axis] != channels):
            summary.problems.append(
                f"{node.op_type} {node.name!r}: weight scales on axis {axis} "
                f"({channels}), expected the output-channel axis {want}"
            )
    return summary


def check_no_quantization(model: Any) -> None:
    """Refuse a graph that is already quantized (it would be quantized twice)."""
    quantized = [
        n.name or n.op_type
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
        or n.op_type.endswith("Integer")
    ]
    if quantized:
        raise QuantizeError(
            f"the graph is already quantized ({len(quantized)} quantized node(s), first "
            f"{quantized[0]!r}); quantize the float32 graph"
        )


def check_float32(model: Any) -> None:
    """Refuse float16/bfloat16 graphs: calibration and Q/DQ need float32 activations."""
    from onnx import TensorProto

    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            raise QuantizeError(
                f"input {value.name!r} is {TensorProto.DataType.Name(elem).lower()}; "
                "INT8 quantization starts from the float32 graph (export with dtype='float32')"
            )
    for tensor in model.graph.initializer:
        if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            raise QuantizeError(
                f"initializer {tensor.name!r} is "
                f"{TensorProto.DataType.Name(tensor.data_type).lower()}; INT8 quantization "
                "starts from the float32 graph (export with dtype='float32')"
            )
