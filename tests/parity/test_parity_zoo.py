"""Zoo models (keras.applications, weights=None) exported with bnexport.export: CPU parity.

Default fp32 tolerances (rtol 1e-3, atol 1e-4), elementwise, on every output and every
mapped layer; then one perturbed weight (a folded bias element) must be caught at the
right layer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from parity_models import perturb_weight, producer_of

import bnexport
from bnexport.parity.check import check_parity
from bnexport.parity.per_layer import metadata_layer_map

ZOO = [
    ("ResNet50", (64, 64, 3), "conv3_block2_2_bn"),
    ("MobileNetV2", (96, 96, 3), "block_5_expand_BN"),
    ("EfficientNetB0", (64, 64, 3), "block4a_expand_bn"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "shape", "victim"), ZOO, ids=[z[0] for z in ZOO])
def test_zoo_parity_and_corruption(name, shape, victim, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=shape, classes=10)
    path = tmp_path / f"{name}.onnx"
    bnexport.export(model, path)
    feed = {model.inputs[0].name: np.random.default_rng(0).uniform(0, 1, (2, *shape))}
    report = check_parity(model, path, inputs=feed, per_layer=True)
    b = report.backends[0]
    assert report.passed, report.to_dict()["backends"][0]["outputs"]
    assert b.first_failing_layer is None
    assert b.outputs[0].top1 == 1.0

    corrupted = onnx.load(path)
    tensor = metadata_layer_map(corrupted)[victim]
    node = producer_of(corrupted, tensor)
    assert node.op_type == "Conv", node.op_type
    # one element of the folded bias B' = (B - mean) * gamma / sigma + beta: shifts one
    # channel by 0.05 whatever the (small, random-init) activations are
    perturb_weight(corrupted, node, delta=0.05, input_index=2)
    bad = tmp_path / "bad.onnx"
    onnx.save(corrupted, bad)
    report = check_parity(model, bad, inputs=feed, per_layer=True)
    assert not report
    assert report.backends[0].first_failing_layer.layer == victim
