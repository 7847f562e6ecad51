"""The QDQ graph: structure (which ops got Q/DQ, int8 symmetric per-channel weights, zero
points 0), scales and numbers against NumPy references, options, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from qmodels import folded_params, fp32_reference, images, qdq_reference, small_cnn

import bnexport
from bnexport.errors import OutputPathError, QuantizeError
from bnexport.quantize.compare import make_session
from bnexport.quantize.qdq import qdq_summary
from bnexport.runtime.cpu_features import hardware_int8_features
from bnexport.runtime.int8_kernels import saturation_risk

# ORT with graph optimizations off runs Q/DQ + float ops: the fake-quant math exactly, up
# to float32 rounding (|ref| <= ~4 here).
FAKE_QUANT_ATOL = 1e-4
# The int8 kernels (QLinearConv/QGemm, requantization with rounding) may differ from fake
# quant by a few rounding steps that propagate: at most 3 LSB of the output scale.
KERNEL_LSB = 3


def _init(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    src = tmp / "cnn.onnx"
    onnx.save(small_cnn(), src)
    calib = images(64)
    report = bnexport.quantize(src, tmp / "cnn.int8.onnx", calib)
    return onnx.load(tmp / "cnn.int8.onnx"), report, calib


def test_structure_qdq_on_linear_ops_only(quantized):
    model, report, _ = quantized
    onnx.checker.check_model(model, full_check=True)
    assert report.bn_folded == 2 and not report.bn_unfolded
    assert report.quantized_nodes == {"conv0": "Conv", "conv1": "Conv", "fc": "Gemm"}
    assert report.float_nodes == {}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):  # data input and weight both dequantized
            assert all(producer[i].op_type == "DequantizeLinear" for i in node.input[:2])
            assert len(node.input) < 3 or node.input[2] in _init(model)  # float bias
        if node.op_type in ("Relu", "GlobalAveragePool", "Flatten"):
            assert node.input[0] not in producer or producer[node.input[0]].op_type in (
                "DequantizeLinear",
                "Relu",
                "GlobalAveragePool",
            )
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 1


def test_weights_int8_symmetric_per_channel_zero_point_zero(quantized):
    model, report, _ = quantized
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = init[node.input[2]]
            assert zp.data_type == TensorProto.INT8, node.name  # no uint8, no int32 bias
            assert not numpy_helper.to_array(zp).any(), node.name
    channels = {"conv0": 8, "conv1": 16, "fc": 10}
    weights = list(report.weights.values())
    assert sorted(w["channels"] for w in weights) == sorted(channels.values())
    assert all(w["dtype"] == "int8" and w["axis"] == 0 and w["zero_points_zero"] for w in weights)
    assert report.tensorrt_ready and not report.tensorrt_problems


def test_scales_match_numpy_minmax(quantized):
    model, _, calib = quantized
    ref = qdq_reference(calib[:1], calib)
    init = _init(model)
    for key, tensor in (("x", "x"), ("fl", "fl")):
        np.testing.assert_allclose(init[f"{tensor}_scale"], ref["scales"][key], rtol=1e-6)
    conv0_scale = next(v for k, v in init.items() if k.startswith("conv0") and "scale" in k)
    np.testing.assert_allclose(conv0_scale, ref["weight_scales"]["w0"], rtol=1e-6)
    np.testing.assert_allclose(init["wf_scale"], ref["weight_scales"]["wf"], rtol=1e-6)
    # the int8 weights are round(W'/s) of the BN-folded weights
    w0_q = next(v for k, v in init.items() if k.startswith("conv0") and k.endswith("quantized"))
    expected = np.rint(folded_params()["w0"] / ref["weight_scales"]["w0"][:, None, None, None])
    np.testing.assert_array_equal(w0_q, expected.astype(np.int8))


def test_numbers_against_numpy_fake_quant_and_fp32(quantized):
    model, report, calib = quantized
    x = images(32, seed=7)
    ref = qdq_reference(x, calib)
    fake = make_session(model, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(fake, ref["logits"], rtol=0, atol=FAKE_QUANT_ATOL)
    kernels = make_session(model).run(None, {"x": x})[0]
    lsb = ref["scales"]["logits"]
    # What must hold on this host: where int8 dot products accumulate in int32 (VNNI,
    # AVX-VNNI, AMX, ARM dot product) the kernels are the Q/DQ math up to rounding; where
    # they do not, this graph's 8-bit weights may saturate them (test_verdict covers
    # that branch), so the numbers below are the graph's own (Q/DQ as float).
    if hardware_int8_features().int32_dot:
        assert np.abs(kernels - fake).max() <= KERNEL_LSB * lsb + 1e-6
    else:
        assert saturation_risk(model).may_saturate
        kernels = fake
    # int8 vs the float model on unseen inputs (some beyond the calibrated range, so
    # clipped): SQNR >= 20 dB (NMSE <= 1 %), no logit off by more than 15 % of max|logit|,
    # and mostly the same class
    fp32 = fp32_reference(x)["logits"]
    nmse = float(np.sum((kernels - fp32) ** 2) / np.sum(fp32**2))
    assert nmse <= 0.01, nmse
    max_err = float(np.abs(kernels - fp32).max())
    assert max_err <= 0.15 * float(np.abs(fp32).max()), max_err
    assert np.mean(kernels.argmax(1) == fp32.argmax(1)) >= 0.9
    assert report.top1_agreement is not None and report.top1_agreement >= 0.95
    assert report.outputs[0].sqnr_db > 25


def test_minmax_range_covers_every_batch(tmp_path, cnn_path):
    """25 calibration batches, the largest |x| in the first one: the scale must see it
    (onnxruntime's CalibMaxIntermediateOutputs would drop early batches)."""
    calib = images(200)
    calib[0, 0, 0, 0] = 40.0
    bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib, batch_size=8)
    scale = _init(onnx.load(tmp_path / "q.onnx"))["x_scale"]
    np.testing.assert_allclose(scale, 40.0 / 127, rtol=1e-6)


def test_metadata_records_quantization_and_keeps_source_metadata(tmp_path, calib):
    model = small_cnn()
    model.metadata_props.add(key="bnexport.layer_outputs", value='{"conv0": "c0"}')
    onnx.save(model, tmp_path / "m.onnx")
    bnexport.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", calib, exclude=["fc"])
    meta = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert meta["bnexport.layer_outputs"] == '{"conv0": "c0"}'
    assert '"excluded": ["fc"]' in meta["bnexport.quantize"]


def test_per_tensor_and_exclude(tmp_path, cnn_path, calib):
    report = bnexport.quantize(
        cnn_path, tmp_path / "q.onnx", calib, per_channel=False, exclude=["conv1"]
    )
    assert set(report.quantized_nodes) == {"conv0", "fc"}
    assert report.float_nodes == {"conv1": "Conv"} and report.excluded == ["conv1"]
    assert all(w["channels"] == 1 and w["axis"] is None for w in report.weights.values())
    model = onnx.load(tmp_path / "q.onnx")
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert conv1.input[1] in _init(model)  # float weight, no DequantizeLinear


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods_clip_no_wider_than_minmax(tmp_path, cnn_path, calib, method):
    bnexport.quantize(cnn_path, tmp_path / "mm.onnx", calib)
    report = bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib, method=method)
    mm, other = _init(onnx.load(tmp_path / "mm.onnx")), _init(onnx.load(tmp_path / "q.onnx"))
    for name in ("x_scale", "fl_scale"):
        assert 0 < other[name] <= mm[name] * (1 + 1e-6), name
    assert report.method == method and report.top1_agreement >= 0.8


def test_unfolded_bn_refused_then_allowed_with_measured_warning(tmp_path, calib):
    onnx.save(small_cnn(unfoldable_bn=True), tmp_path / "m.onnx")
    with pytest.raises(QuantizeError, match="could not be folded.*allow_unfolded_bn"):
        bnexport.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", calib)
    assert not (tmp_path / "q.onnx").exists()
    with pytest.warns(UserWarning, match=r"left unfolded .*top-1 agreement \d"):
        report = bnexport.quantize(
            tmp_path / "m.onnx", tmp_path / "q.onnx", calib, allow_unfolded_bn=True
        )
    assert report.bn_unfolded and report.warnings and report.bn_folded == 2


def test_refusals_write_nothing(tmp_path, cnn_path, calib):
    with pytest.raises(OutputPathError, match="input"):
        bnexport.quantize(cnn_path, cnn_path, calib)
    with pytest.raises(QuantizeError, match="no node named 'nope'"):
        bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib, exclude=["nope"])
    with pytest.raises(QuantizeError, match="method must be one of"):
        bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib, method="kl")
    bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib)
    with pytest.raises(QuantizeError, match="already quantized"):
        bnexport.quantize(tmp_path / "q.onnx", tmp_path / "qq.onnx", calib)
    half = onnx.load(cnn_path)
    half.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(QuantizeError, match="float16"):
        bnexport.quantize(half, tmp_path / "h.onnx", calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "q.onnx"]


def test_summary_flags_a_tensorrt_problem():
    """qdq_summary is a real check: a uint8 zero point (asymmetric activations) is flagged."""
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) <uint8 zp = {3}, float s = {0.1}> {
            q = QuantizeLinear(x, s, zp)
            y = DequantizeLinear(q, s, zp)
        }"""
    )
    summary = qdq_summary(model)
    assert not summary.tensorrt_ready and not summary.int8_only
    assert not summary.all_zero_points_zero


def test_cpu_target_uint8_activations_flagged_for_tensorrt(tmp_path, cnn_path, calib):
    import collections

    import onnxruntime as ort

    report = bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib, target="cpu")
    model = onnx.load(tmp_path / "q.onnx")
    init = {t.name: t for t in model.graph.initializer}
    activation_zp = [
        init[n.input[2]]
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init
    ]
    assert activation_zp and all(zp.data_type == TensorProto.UINT8 for zp in activation_zp)
    assert all(w["dtype"] == "int8" and w["zero_points_zero"] for w in report.weights.values())
    assert not report.tensorrt_ready
    assert any("TensorRT needs int8" in p for p in report.tensorrt_problems)
    assert report.target == "cpu" and report.top1_agreement >= 0.95
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0, ops
