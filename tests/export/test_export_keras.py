"""End-to-end export of Keras 3 models: graph contents, report, and outputs vs Keras.

Every test runs the written ONNX file with onnxruntime (graph optimizations disabled) and
compares with ``model(x, training=False)`` at the tolerances of ``export_models.TOL``.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from export_models import (  # noqa: E402
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    op_counts,
    randomize_biases,
    randomize_bn,
    run_onnx,
)

import bnexport  # noqa: E402
from bnexport.errors import ExportError  # noqa: E402

L = keras.layers


def _finish(model, seed=0):
    randomize_bn(model, seed)
    randomize_biases(model, seed + 1)
    return model


def _conv_bn(kind: str):
    inp = keras.Input((12, 12, 4), name="image")
    if kind == "conv":
        x = L.Conv2D(6, 3, padding="same", name="lin")(inp)
    elif kind == "conv_nobias":
        x = L.Conv2D(6, 3, use_bias=False, name="lin")(inp)
    elif kind == "depthwise":
        x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="lin")(inp)
    elif kind == "separable":
        x = L.SeparableConv2D(6, 3, name="lin")(inp)
    elif kind == "transpose":
        x = L.Conv2DTranspose(5, 3, strides=2, name="lin")(inp)
    elif kind == "grouped":
        x = L.Conv2D(8, 3, groups=2, name="lin")(inp)
    else:
        raise AssertionError(kind)
    x = L.BatchNormalization(name="bn")(x)
    out = L.ReLU(name="relu")(x)
    return _finish(keras.Model(inp, out, name=f"m_{kind}"))


@pytest.mark.parametrize(
    "kind", ["conv", "conv_nobias", "depthwise", "separable", "transpose", "grouped"]
)
def test_conv_family_bn_folds_forward(tmp_path, kind):
    model = _conv_bn(kind)
    path = tmp_path / f"{kind}.onnx"
    report = bnexport.export(model, path)
    assert [(r.name, r.action) for r in report.records] == [("bn", "folded_forward")]
    assert report.verify is not None and report.verify.passed
    assert bn_derived_nodes(path) == []
    counts = op_counts(path)
    if kind == "grouped":
        convs = [n for n in onnx.load(path).graph.node if n.op_type == "Conv"]
        assert len(convs) == 1
        assert {a.name: a.i for a in convs[0].attribute}["group"] == 2
    assert "StatefulPartitionedCall" not in counts
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert_matches_keras(path, model, image_feed("image", (12, 12, 4)))


def test_dense_bn_weights_match_numpy_fold(tmp_path):
    """The folded Gemm/MatMul weights equal W·γ/√(var+ε) computed here in NumPy."""
    inp = keras.Input((7,), name="x")
    x = L.Dense(5, name="dense")(inp)
    out = L.BatchNormalization(epsilon=1e-3, name="bn")(x)
    model = _finish(keras.Model(inp, out))
    path = tmp_path / "dense.onnx"
    report = bnexport.export(model, path)
    assert [r.action for r in report.records] == ["folded_forward"]
    graph = onnx.load(path).graph
    assert [n.op_type for n in graph.node] in (["Gemm"], ["MatMul", "Add"])
    bn = model.get_layer("bn")
    w, b = (v.numpy().astype(np.float64) for v in model.get_layer("dense").weights)
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy().astype(np.float64) + 1e-3)
    shift = bn.beta.numpy() - bn.moving_mean.numpy() * scale
    expected_w = w * scale
    expected_b = b * scale + shift
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    weights = [a for a in inits.values() if a.shape in ((7, 5), (5, 7))]
    assert len(weights) == 1
    got_w = weights[0] if weights[0].shape == (7, 5) else weights[0].T
    np.testing.assert_allclose(got_w, expected_w, rtol=1e-6, atol=1e-7)
    biases = [a for a in inits.values() if a.shape == (5,)]
    np.testing.assert_allclose(biases[0], expected_b, rtol=1e-6, atol=1e-6)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)}
    assert_matches_keras(path, model, feeds)


def test_sequential_model(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(4, 3, name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.Flatten(),
            L.Dense(3, name="d"),
            L.BatchNormalization(name="bn2"),
        ]
    )
    _finish(model)
    path = tmp_path / "seq.onnx"
    report = bnexport.export(model, path)
    assert {r.name: r.action for r in report.records} == {
        "bn1": "folded_forward",
        "bn2": "folded_forward",
    }
    assert bn_derived_nodes(path) == []
    name = onnx.load(path).graph.input[0].name
    assert_matches_keras(path, model, image_feed(name, (10, 10, 3)))


def test_preactivation_bn_is_one_node_and_bn_before_conv_folds_backward(tmp_path):
    inp = keras.Input((9, 9, 4), name="image")
    x = L.Conv2D(6, 3, padding="same", name="c0")(inp)
    x = L.ReLU(name="r0")(x)
    x = L.BatchNormalization(name="bn_pre")(x)  # BN -> ReLU: neither side can absorb it
    x = L.ReLU(name="r1")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.BatchNormalization(name="bn_back")(x)  # BN -> valid conv: folds backward
    x = L.Conv2D(5, 3, padding="valid", name="c1")(x)
    model = _finish(keras.Model(inp, x))
    path = tmp_path / "pre.onnx"
    report = bnexport.export(model, path)
    actions = {r.name: r.action for r in report.records}
    assert actions == {"bn_pre": "fused", "bn_back": "folded_backward"}
    assert report.summary["fused"] == 1 and report.summary["folded_backward"] == 1
    assert op_counts(path).get("BatchNormalization", 0) == 1
    assert len(bn_derived_nodes(path)) == 1
    assert "fused" in str(report) and "bn_pre" in str(report)
    assert_matches_keras(path, model, image_feed("image", (9, 9, 4)))


def test_bn_with_two_consumers_and_bn_on_input(tmp_path):
    inp = keras.Input((8, 8, 3), name="image")
    x0 = L.BatchNormalization(name="bn_in")(inp)  # directly on the graph input
    x = L.Conv2D(6, 3, padding="same", name="c")(x0)
    x = L.BatchNormalization(name="bn_two")(x)
    a = L.ReLU(name="ra")(x)
    b = L.Conv2D(6, 1, name="cb")(x)  # second consumer of bn_two
    out = L.Add(name="sum")([a, b])
    model = _finish(keras.Model(inp, out))
    path = tmp_path / "two.onnx"
    report = bnexport.export(model, path)
    actions = {r.name: r.action for r in report.records}
    assert actions["bn_two"] == "folded_forward"
    assert actions["bn_in"] in ("folded_backward", "fused")
    assert len(bn_derived_nodes(path)) == (1 if actions["bn_in"] == "fused" else 0)
    assert_matches_keras(path, model, image_feed("image", (8, 8, 3)))


def test_bnexport_batch_normalization_layer(tmp_path):
    import bnexport.layers.batch_normalization as layers_mod

    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="c")(inp)
    x = layers_mod.BatchNormalization(name="ours")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(3, name="d")(x)
    x = layers_mod.BatchNormalization(name="ours_dense", center=False)(x)
    model = _finish(keras.Model(inp, x))
    path = tmp_path / "ours.onnx"
    report = bnexport.export(model, path)
    assert {r.name: r.action for r in report.records} == {
        "ours": "folded_forward",
        "ours_dense": "folded_forward",
    }
    assert bn_derived_nodes(path) == []
    assert_matches_keras(path, model, image_feed("image", (8, 8, 3)))


@pytest.mark.parametrize("field", ["moving_mean", "moving_variance_negative", "gamma"])
def test_bad_statistics_name_the_layer(tmp_path, field):
    model = _conv_bn("conv")
    bn = model.get_layer("bn")
    values = np.ones(6, np.float32)
    if field == "moving_mean":
        values[2] = np.nan
        bn.moving_mean.assign(values)
    elif field == "gamma":
        values[1] = np.inf
        bn.gamma.assign(values)
    else:
        values[4] = -0.5
        bn.moving_variance.assign(values)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"\bbn\b"):
        bnexport.export(model, path)
    assert not path.exists()


def test_model_without_bn_exports_and_says_so(tmp_path):
    inp = keras.Input((6,), name="x")
    out = L.Dense(2, name="d")(L.Dense(4, activation="relu")(inp))
    model = _finish(keras.Model(inp, out))
    path = tmp_path / "nobn.onnx"
    report = bnexport.export(model, path)
    assert report.records == [] and report.summary["total"] == 0
    assert any("no batch normalization" in note for note in report.notes)
    assert "no batch normalization" in str(report)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)}
    assert_matches_keras(path, model, feeds)


def test_report_json_table_and_metadata(tmp_path):
    from rich.console import Console

    model = _conv_bn("conv")
    path = tmp_path / "r.onnx"
    report = bnexport.export(model, path)
    data = json.loads(report.to_json())
    assert data["records"] == [
        {"name": "bn", "action": "folded_forward", "target": report.records[0].target, "reason": ""}
    ]
    assert report.records[0].target in {n.name for n in onnx.load(path).graph.node}
    assert data["summary"] == {
        "folded_forward": 1,
        "folded_backward": 0,
        "fused": 0,
        "kept": 0,
        "total": 1,
    }
    assert data["opset"] == 17 and data["dtype"] == "float32" and data["path"] == str(path)
    assert data["verify"]["passed"] is True
    assert data["verify"]["max_abs_error"] <= data["verify"]["tolerance"]
    assert data["inputs"] == {"image": [None, 12, 12, 4]}
    assert data["timings"]["total"] > 0
    console = Console(record=True, width=160)
    console.print(report.table())
    text = console.export_text()
    assert "bn" in text and "folded_forward" in text and "verify passed" in text
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["bnexport.layer_outputs"]) == report.layer_outputs


def test_layer_outputs_mapping_is_numerically_right(tmp_path):
    """Every mapped tensor, transposed by its perm, equals the Keras layer's output."""
    inp = keras.Input((10, 10, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.BatchNormalization(name="bn_pre")(x)
    x = L.ReLU(name="r2")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(4, name="d")(x)
    out = L.BatchNormalization(name="bn_out")(x)
    model = _finish(keras.Model(inp, out))
    path = tmp_path / "map.onnx"
    report = bnexport.export(model, path)
    mapping, perms = report.layer_outputs, report.layer_output_perms
    for name in ("image", "bn1", "r1", "r2", "bn_out"):
        assert name in mapping, (name, mapping)
    assert "c1" not in mapping  # its output no longer exists after the fold
    onnx_model = onnx.load(path)
    graph_outputs = {o.name for o in onnx_model.graph.output}
    for tensor in set(mapping.values()) - graph_outputs:
        onnx_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    names = [o.name for o in onnx_model.graph.output]
    feeds = image_feed("image", (10, 10, 3))
    values = dict(zip(names, run_onnx(onnx_model, feeds), strict=True))
    layers = [n for n in mapping if n != "image"]
    probe = keras.Model(inp, [model.get_layer(n).output for n in layers])
    refs = dict(zip(layers, probe(feeds["image"], training=False), strict=True))
    for layer in layers:
        got = values[mapping[layer]]
        if layer in perms:
            got = got.transpose(perms[layer])
        ref = np.asarray(refs[layer])
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max() + 1e-5)


def test_static_batch_and_opset(tmp_path):
    model = _conv_bn("conv")
    path = tmp_path / "static.onnx"
    report = bnexport.export(model, path, dynamic_batch=False, opset=15)
    graph_input = onnx.load(path).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_value == 1
    assert report.inputs["image"] == [1, 12, 12, 4]
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 15
    assert report.verify.batch == 1
    assert_matches_keras(path, model, image_feed("image", (12, 12, 4), batch=1))


def test_unconvertible_layer_is_named(tmp_path):
    class Lgamma(L.Layer):
        def call(self, x):
            return tf.math.lgamma(x)

    inp = keras.Input((4,), name="x")
    out = Lgamma(name="weird_layer")(L.Dense(3, name="d")(inp))
    path = tmp_path / "weird.onnx"
    with pytest.raises(ExportError, match="weird_layer.*Lgamma"):
        bnexport.export(keras.Model(inp, out), path)
    assert not path.exists()


def test_bad_options_fail_before_anything(tmp_path):
    model = _conv_bn("conv")
    with pytest.raises(ExportError, match="dtype"):
        bnexport.export(model, tmp_path / "x.onnx", dtype="int8")
    with pytest.raises(ExportError, match="fused_norm"):
        bnexport.export(model, tmp_path / "x.onnx", fused_norm="cuda")
    assert list(tmp_path.iterdir()) == []


def test_shared_bn_layer_and_two_inputs(tmp_path):
    """One BN layer object called on two branches: one record per call, both folded."""
    conv = L.Conv2D(4, 3, name="shared_conv")
    bn = L.BatchNormalization(name="shared_bn")
    a_in = keras.Input((8, 8, 3), name="a")
    b_in = keras.Input((8, 8, 3), name="b")
    out = L.Concatenate(name="cat")([bn(conv(a_in)), bn(conv(b_in))])
    model = _finish(keras.Model([a_in, b_in], out))
    path = tmp_path / "shared.onnx"
    report = bnexport.export(model, path)
    assert [(r.name, r.action) for r in report.records] == [("shared_bn", "folded_forward")] * 2
    assert bn_derived_nodes(path) == []
    assert [i.name for i in onnx.load(path).graph.input] == ["a", "b"]
    feeds = {**image_feed("a", (8, 8, 3), seed=1), **image_feed("b", (8, 8, 3), seed=2)}
    assert_matches_keras(path, model, feeds)


def test_conv1d_grouped_and_causal_bn_fold(tmp_path):
    """tf2onnx wraps Conv1D in Unsqueeze/Conv/Squeeze; the BN still folds into the Conv."""
    inp = keras.Input((16, 6), name="seq")
    x = L.Conv1D(8, 3, groups=2, padding="same", name="g1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Conv1D(8, 3, padding="causal", name="c1")(x)
    x = L.BatchNormalization(name="bn2")(x)
    out = L.ReLU(name="relu")(x)
    model = _finish(keras.Model(inp, out))
    path = tmp_path / "c1d.onnx"
    report = bnexport.export(model, path)
    assert {r.name: r.action for r in report.records} == {
        "bn1": "folded_forward",
        "bn2": "folded_forward",
    }
    assert bn_derived_nodes(path) == []
    groups = [
        {a.name: a.i for a in n.attribute}.get("group", 1)
        for n in onnx.load(path).graph.node
        if n.op_type == "Conv"
    ]
    assert sorted(groups) == [1, 2]
    feeds = {"seq": np.random.default_rng(0).standard_normal((3, 16, 6)).astype(np.float32)}
    assert_matches_keras(path, model, feeds)


def test_verify_tolerance_override(tmp_path):
    """verify_rtol/verify_atol replace the dtype's defaults; a too-tight bound fails the
    export naming the way out, and nothing is written."""
    model = _conv_bn("conv")
    report = bnexport.export(model, tmp_path / "loose.onnx", verify_rtol=5e-3, verify_atol=5e-4)
    assert (report.verify.rtol, report.verify.atol) == (5e-3, 5e-4) and report.verify.passed
    # float32 TF vs onnxruntime after folding differ by some ulps on 1728 elements
    tight = tmp_path / "tight.onnx"
    with pytest.raises(ExportError, match="--rtol/--atol"):
        bnexport.export(model, tight, verify_rtol=0.0, verify_atol=1e-12, verify_range_rtol=0.0)
    assert not tight.exists()
