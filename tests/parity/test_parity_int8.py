"""Parity on INT8 (QDQ) graphs: top-1 agreement decides, per-layer ranks what to exclude.

References are independent: top-1 agreement is recomputed from Keras and a plain
onnxruntime session with NumPy; the ranking is checked by corrupting one quantized layer
and finding it first; the ``--exclude`` names are fed back to ``bnexport.quantize``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from parity_models import conv_bn_model, producer_of

import bnexport
from bnexport.cli.main import main
from bnexport.parity.check import check_parity
from bnexport.parity.per_layer import metadata_layer_map
from bnexport.quantize import quantize
from bnexport.tolerance import INT8_MIN_TOP1, is_quantized


def _export_and_quantize(model, folder, calib):
    fp32 = folder / "pnet.onnx"
    bnexport.export(model, fp32)
    q = folder / "pnet.int8.onnx"
    quantize(fp32, q, calib)
    return model, fp32, q, calib


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """The test CNN with its logits centered on the data (bias = −W·E[features]), so the
    predicted class varies between inputs and top-1 agreement means something."""
    import keras

    model = conv_bn_model()
    calib = np.random.default_rng(11).standard_normal((64, 8, 8, 3)).astype(np.float32)
    features = keras.Model(model.inputs, model.get_layer("gap").output)([calib]).numpy()
    dense = model.get_layer("logits")
    kernel, _ = dense.get_weights()
    dense.set_weights([kernel, -features.mean(0) @ kernel])
    return _export_and_quantize(model, tmp_path_factory.mktemp("int8"), calib)


@pytest.fixture(scope="module")
def int8_plain(tmp_path_factory):
    """The test CNN as built (logits not centered: a small relative error at the end)."""
    calib = np.random.default_rng(11).standard_normal((64, 8, 8, 3)).astype(np.float32)
    return _export_and_quantize(conv_bn_model(), tmp_path_factory.mktemp("int8p"), calib)


@pytest.fixture(scope="module")
def feed():
    return np.random.default_rng(12).standard_normal((40, 8, 8, 3)).astype(np.float32)


def _top1_numpy(model, path, x):
    ref = model(x, training=False).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(ref.argmax(1) == got.argmax(1)))


def test_int8_graph_is_judged_by_top1_agreement(int8, feed):
    model, fp32, q, _ = int8
    assert is_quantized(onnx.load(q)) and not is_quantized(onnx.load(fp32))
    report = check_parity(model, q, inputs=feed)  # a bare array: single-input model
    (b,) = report.backends
    assert b.quantized and b.precision == "int8"
    (out,) = b.outputs
    assert out.check == "agreement" and out.min_top1 == INT8_MIN_TOP1
    expected = _top1_numpy(model, q, feed)
    # top-1 is informative here (else cosine would decide): the reference uses >1 class
    assert np.unique(model(feed, training=False).numpy().argmax(1)).size > 1
    assert out.top1 == pytest.approx(expected) and b.top1 == pytest.approx(expected)
    assert report.passed == (expected >= INT8_MIN_TOP1)
    # the float policy would reject the same graph: INT8 needs its own defaults
    strict = check_parity(model, q, inputs=feed, check="elementwise", rtol=1e-4, atol=1e-4)
    assert not strict.passed and strict.backends[0].outputs[0].max_absdiff > 1e-3
    # a threshold above the measured agreement fails it, one below passes it
    assert not check_parity(model, q, inputs=feed, min_top1=min(1.0, expected + 0.01)) or (
        expected == 1.0
    )
    assert check_parity(model, q, inputs=feed, min_top1=max(0.0, expected - 0.01)).passed


def test_float_graph_keeps_the_float_policy(int8, feed):
    model, fp32, _, _ = int8
    report = check_parity(model, fp32, inputs=feed, per_layer=True)
    (b,) = report.backends
    assert report.passed and not b.quantized and b.layer_losses == []
    assert b.outputs[0].check == "elementwise" and b.outputs[0].rtol == 1e-4


def test_per_layer_ranks_the_corrupted_layer_first_and_names_nodes_to_exclude(
    int8_plain, feed, tmp_path
):
    model, fp32, q, calib = int8_plain
    graph = onnx.load(q)
    conv = producer_of(graph, metadata_layer_map(graph)["bn2"])
    assert conv.op_type == "Conv"
    quantized_weight = producer_of(graph, conv.input[1])
    assert quantized_weight.op_type == "DequantizeLinear"  # so the exclude below changes it
    # add a large error to this one layer: its float bias (BN folded in) gets +2
    inits = {i.name: i for i in graph.graph.initializer}
    bias = onnx.numpy_helper.to_array(inits[conv.input[2]]).copy() + 2.0
    inits[conv.input[2]].CopyFrom(onnx.numpy_helper.from_array(bias, conv.input[2]))
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(graph, bad)

    report = check_parity(model, bad, inputs=feed, per_layer=True)
    (b,) = report.backends
    losses = b.layer_losses
    assert losses and losses[0].layer in ("conv2", "bn2"), [(x.layer, x.added_nmse) for x in losses]
    assert conv.name in losses[0].nodes
    assert losses[0].added_nmse > 10 * max(
        x.added_nmse for x in losses if x.tensor != losses[0].tensor
    )
    # NMSE is Σ(out − ref)² / Σ ref², recomputed here in float64 for the top layer
    top = next(r for r in b.layers if r.layer == losses[0].layer)
    assert top.comparison.nmse == pytest.approx(losses[0].nmse)
    assert conv.name in b.exclude_candidates
    report.write_html(tmp_path / "int8.html")
    page = (tmp_path / "int8.html").read_text()
    assert "INT8 (QDQ) graph" in page and conv.name in page
    assert report.to_dict()["backends"][0]["exclude_candidates"] == b.exclude_candidates
    # per-layer results of an INT8 graph are reported, not failed: the output decides
    assert report.passed == all(b.outputs)
    # the names are what quantize's exclude takes: that node then stays float32
    kept = tmp_path / "kept.int8.onnx"
    qreport = quantize(fp32, kept, calib, exclude=b.exclude_candidates)
    assert conv.name in qreport.excluded
    kept_graph = onnx.load(kept)
    kept_conv = next(n for n in kept_graph.graph.node if n.name == conv.name)
    producers = {o: n for n in kept_graph.graph.node for o in n.output}
    weight = producers.get(kept_conv.input[1])
    assert weight is None or weight.op_type != "DequantizeLinear"  # a float weight


def test_cli_parity_on_int8(int8, feed, tmp_path, capsys):
    model, _, q, _ = int8
    keras_path = tmp_path / "pnet.keras"
    model.save(keras_path)
    x = tmp_path / "x.npy"
    np.save(x, feed)
    expected = _top1_numpy(model, q, feed)
    code = main(["parity", str(keras_path), str(q), "--inputs", str(x), "--per-layer"])
    text = capsys.readouterr().out
    assert code == (0 if expected >= INT8_MIN_TOP1 else 1)
    assert "INT8 (QDQ) graph" in text and f"top-1 agreement {expected:.2%}" in text
    assert "layers adding most INT8 error" in text and "--exclude" in text
    assert main(["parity", str(keras_path), str(q), "--inputs", str(x), "--min-top1", "0"]) == 0
    assert main(["parity", str(keras_path), str(q), "--min-top1", "1.5"]) == 2
