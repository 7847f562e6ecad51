"""End-to-end parity on a small exported Keras BN model.

fp32 defaults from bnexport.tolerance: elementwise, rtol 1e-4, atol 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from parity_models import conv_bn_model, perturb_weight, producer_of

import bnexport
from bnexport.parity.check import check_parity
from bnexport.parity.per_layer import metadata_layer_map


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = conv_bn_model()
    path = tmp_path_factory.mktemp("parity") / "pnet.onnx"
    bnexport.export(model, path)
    return model, path


@pytest.fixture(scope="module")
def feed():
    return {"image": np.random.default_rng(5).standard_normal((6, 8, 8, 3)).astype(np.float32)}


def test_clean_export_passes_per_layer(exported, feed):
    model, path = exported
    report = check_parity(model, path, inputs=feed, per_layer=True)
    assert report and report.passed
    (b,) = report.backends
    (out,) = b.outputs
    assert out.name == "logits" and out.shape == (6, 10)
    assert out.max_absdiff < 1e-4 and out.cosine > 0.999999 and out.top1 == 1.0
    assert b.layer_map_source == "metadata"
    compared = [r.layer for r in b.layers if r.comparison is not None]
    # every BN maps to a tensor (folded Conv output) and they come in graph order
    assert [n for n in compared if n.startswith("bn")] == ["bn1", "bn2", "bn3"]
    assert compared.index("bn1") < compared.index("relu1") < compared.index("bn2")
    assert b.first_failing_layer is None
    json.loads(report.to_json())


def test_random_samples_and_keras_input_names(exported):
    model, path = exported
    report = check_parity(model, path, samples=3, seed=1)
    assert report.passed and report.samples == 3 and report.inputs == {"image": [3, 8, 8, 3]}


def test_corrupted_weight_is_caught_and_layer_named(exported, feed, tmp_path):
    model, path = exported
    onnx_model = onnx.load(path)
    mapping = metadata_layer_map(onnx_model)
    node = producer_of(onnx_model, mapping["bn2"])  # the Conv that bn2 was folded into
    assert node.op_type == "Conv"
    perturb_weight(onnx_model, node, delta=0.5)
    bad = tmp_path / "corrupt.onnx"
    onnx.save(onnx_model, bad)
    report = check_parity(model, bad, inputs=feed, per_layer=True)
    assert not report
    (b,) = report.backends
    assert not b.outputs[0].passed
    first = b.first_failing_layer
    assert first is not None and first.layer == "bn2", [(r.layer, r.failed) for r in b.layers]
    by_name = {r.layer: r for r in b.layers}
    assert by_name["bn1"].comparison.passed and by_name["relu1"].comparison.passed
    assert report.to_dict()["backends"][0]["first_failing_layer"] == "bn2"


def test_nonfinite_outputs_are_reported(exported, feed, tmp_path):
    model, path = exported
    onnx_model = onnx.load(path)
    node = producer_of(onnx_model, "logits")
    if node.op_type == "Add":  # MatMul + Add: poison the MatMul weight
        node = producer_of(onnx_model, node.input[0])
    perturb_weight(onnx_model, node, delta=np.nan)
    bad = tmp_path / "nan.onnx"
    onnx.save(onnx_model, bad)
    report = check_parity(model, bad, inputs=feed)
    out = report.backends[0].outputs[0]
    assert not report and out.nonfinite_out["nan"] == 6  # one logit column, 6 samples
    assert out.nonfinite_ref == {"nan": 0, "inf": 0}
    assert np.isfinite(out.max_absdiff) and "NaN" in out.reason
    json.loads(report.to_json())  # strict JSON: no NaN literals


def test_explicit_tolerance_can_fail_a_clean_export(exported, feed):
    model, path = exported
    report = check_parity(model, path, inputs=feed, rtol=0.0, atol=1e-12, range_rtol=0.0)
    assert not report  # float32 reassociation error > 1e-12


def test_html_and_json_reports(exported, feed, tmp_path):
    model, path = exported
    report = check_parity(model, path, inputs=feed, per_layer=True)
    report.write_html(tmp_path / "r.html")
    report.write_json(tmp_path / "r.json")
    text = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in text and "bn2" in text and "PASS" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is True and data["backends"][0]["outputs"][0]["name"] == "logits"


def test_heuristic_layer_map_for_plain_tf2onnx(feed, tmp_path):
    import tensorflow as tf
    import tf2onnx

    model = conv_bn_model("plain")
    spec = (tf.TensorSpec((None, 8, 8, 3), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def fn(image):
        return {"logits": model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    report = check_parity(model, proto, inputs=feed, per_layer=True)
    assert report.passed
    b = report.backends[0]
    assert b.layer_map_source == "heuristic"
    layouts = {r.layer: r.layout for r in b.layers if r.comparison is not None}
    # relu3 is [N, 8, 8, 8]: its layout comes from the graph's Transposes, not the shape
    assert {"relu1", "relu2", "relu3"} <= set(layouts)
    assert layouts["relu3"] == "transpose(0, 2, 3, 1)" and layouts["logits"] == "same"


@pytest.mark.needs_absent("tensorrt", why="checks the report without TensorRT")
def test_missing_backend_fails_the_report(exported, feed):
    model, path = exported
    report = check_parity(model, path, inputs=feed, backends=("onnxruntime", "tensorrt"))
    ort_result, trt_result = report.backends
    assert ort_result.passed and "tensorrt" in trt_result.error and not report


def test_usage_errors(exported, tmp_path):
    from bnexport.errors import UsageError

    model, path = exported
    with pytest.raises(UsageError, match="backends must be among"):
        check_parity(model, path, backends=("tvm",))
    with pytest.raises(UsageError, match="ONNX model not found"):
        check_parity(model, tmp_path / "none.onnx")
    with pytest.raises(UsageError, match="input 'image'"):
        check_parity(model, path, inputs={"image": np.zeros((2, 4, 4, 3), np.float32)})


def test_inputs_as_array_or_list_match_the_dict_feed(exported, feed):
    model, path = exported
    by_dict = check_parity(model, path, inputs=feed)
    for given in (feed["image"], [feed["image"]], (feed["image"],)):
        report = check_parity(model, path, inputs=given)
        assert report.passed and report.inputs == {"image": [6, 8, 8, 3]}
        got, want = report.backends[0].outputs[0], by_dict.backends[0].outputs[0]
        assert got.max_absdiff == want.max_absdiff
    from bnexport.errors import UsageError

    with pytest.raises(UsageError, match="2 input arrays given for a model with 1 inputs"):
        check_parity(model, path, inputs=[feed["image"], feed["image"]])
    with pytest.raises(UsageError, match="Received: set"):
        check_parity(model, path, inputs={1, 2})
