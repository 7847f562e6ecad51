"""Small real architectures, BN statistics randomized so that folding is exercised."""

from __future__ import annotations

import keras
import pytest
from export_models import (  # noqa: E402
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    randomize_biases,
    randomize_bn,
)

import bnexport  # noqa: E402

L = keras.layers


def _resnet_ish(preactivation: bool):
    """Two stages of basic residual blocks (v1: conv-BN-relu; v2: BN-relu-conv)."""
    inp = keras.Input((32, 32, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inp)
    if not preactivation:
        x = L.ReLU()(L.BatchNormalization(name="stem_bn")(x))
    for stage, filters in enumerate((16, 32)):
        for block in range(2):
            name = f"s{stage}b{block}"
            stride = 2 if stage and not block else 1
            shortcut = x
            if preactivation:
                y = L.ReLU()(L.BatchNormalization(name=f"{name}_bn1")(x))
                y = L.Conv2D(filters, 3, stride, padding="same", name=f"{name}_c1")(y)
                y = L.ReLU()(L.BatchNormalization(name=f"{name}_bn2")(y))
                y = L.Conv2D(filters, 3, padding="same", name=f"{name}_c2")(y)
            else:
                y = L.Conv2D(filters, 3, stride, padding="same", name=f"{name}_c1")(x)
                y = L.ReLU()(L.BatchNormalization(name=f"{name}_bn1")(y))
                y = L.Conv2D(filters, 3, padding="same", name=f"{name}_c2")(y)
                y = L.BatchNormalization(name=f"{name}_bn2")(y)
            if stride != 1 or shortcut.shape[-1] != filters:
                shortcut = L.Conv2D(filters, 1, stride, name=f"{name}_proj")(shortcut)
                if not preactivation:
                    shortcut = L.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
            x = L.Add()([y, shortcut])
            if not preactivation:
                x = L.ReLU()(x)
    if preactivation:
        x = L.ReLU()(L.BatchNormalization(name="post_bn")(x))
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10, name="logits")(x)
    model = keras.Model(inp, out, name="resnet_v2ish" if preactivation else "resnet_ish")
    randomize_bn(model)
    randomize_biases(model)
    return model


def test_resnet_ish_v1_folds_every_bn(tmp_path):
    model = _resnet_ish(preactivation=False)
    path = tmp_path / "r1.onnx"
    report = bnexport.export(model, path)
    assert report.summary["total"] == 10
    assert report.summary["folded_forward"] == 10
    assert bn_derived_nodes(path) == []
    assert_matches_keras(path, model, image_feed("image", (32, 32, 3)))


def test_resnet_ish_v2_one_node_per_unfoldable_bn(tmp_path):
    model = _resnet_ish(preactivation=True)
    path = tmp_path / "r2.onnx"
    report = bnexport.export(model, path)
    s = report.summary
    assert s["total"] == 9
    # BN -> ReLU -> conv can fold into neither side: exactly one node each
    assert s["folded_forward"] + s["folded_backward"] + s["fused"] == 9 and s["kept"] == 0
    assert len(bn_derived_nodes(path)) == s["fused"]
    assert_matches_keras(path, model, image_feed("image", (32, 32, 3)))


def test_mobilenet_v2_small(tmp_path):
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10, classifier_activation=None
    )
    randomize_bn(model)
    path = tmp_path / "mnv2.onnx"
    report = bnexport.export(model, path)
    assert report.summary["total"] == 52 and report.summary["folded_forward"] == 52
    assert bn_derived_nodes(path) == []
    name = report.inputs and next(iter(report.inputs))
    assert_matches_keras(path, model, image_feed(name, (96, 96, 3), batch=2))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_efficientnet_b0_small(tmp_path, dtype):
    model = keras.applications.EfficientNetB0(
        input_shape=(64, 64, 3), weights=None, classes=10, classifier_activation=None
    )
    randomize_bn(model)
    path = tmp_path / f"effb0_{dtype}.onnx"
    report = bnexport.export(model, path, dtype=dtype)
    assert report.summary["kept"] == 0
    assert len(bn_derived_nodes(path)) == report.summary["fused"]
    name = next(iter(report.inputs))
    assert_matches_keras(path, model, image_feed(name, (64, 64, 3), batch=2), dtype=dtype)
