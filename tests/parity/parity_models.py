"""Small BN models for parity tests, with non-trivial statistics, and ONNX helpers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def conv_bn_model(name: str = "pnet", bn_cls=None):
    """conv-bn-relu x3 -> GAP -> Dense logits (10 classes) on 8x8x3 inputs; BN stats randomized."""
    import keras

    bn = bn_cls or keras.layers.BatchNormalization
    keras.utils.set_random_seed(7)
    x = inp = keras.Input((8, 8, 3), name="image")
    for i, filters in enumerate((4, 6, 8), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=i != 2, name=f"conv{i}")(x)
        x = bn(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inp, out, name=name)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if "bn" in layer.name:
            c = int(layer.moving_mean.shape[0])
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
    return model


def producer_of(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def perturb_weight(
    model: onnx.ModelProto, node: onnx.NodeProto, delta: float, input_index: int = 1
) -> str:
    """Add ``delta`` to one element of an initializer of ``node`` (default: input 1, the weight).

    Returns the initializer's name.
    """
    inits = {i.name: i for i in model.graph.initializer}
    name = node.input[input_index]
    arr = numpy_helper.to_array(inits[name]).copy()
    arr.flat[arr.size // 2] += delta
    inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return name
