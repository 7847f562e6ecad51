"""Each converter of the Keras-native emitter against Keras's own forward pass.

Every model is exported with ``engine="keras"`` (verification off: the comparison here is
independent of the exporter's) and run in onnxruntime with graph optimizations off; the
outputs must match ``model(x, training=False)`` within ``export_models.TOL["float32"]``:
``max|onnx − keras| <= 1e-4·max|keras| + 1e-5`` (float32 reordering over a few layers
stays far below it; a layout or axis mistake is O(1)).

BN statistics are randomized *per channel* (``randomize_bn``): with Keras's default
statistics (mean 0, variance 1) a fold on the wrong axis would still pass. Inputs are
small (≤ 17², batch 3) to keep the default run fast.
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from export_models import (
    assert_matches_keras,
    bn_derived_nodes,
    image_feed,
    op_counts,
    randomize_biases,
    randomize_bn,
)
from keras import layers as L
from keras import ops

import bnexport


def _export(model, tmp_path, **options):
    path = tmp_path / "m.onnx"
    report = bnexport.export(model, path, engine="keras", verify=False, **options)
    assert report.engine == "keras" and report.fallback_reason == ""
    return report, path


def _check(model, tmp_path, shape, *, name="x", **options):
    randomize_bn(model)
    randomize_biases(model)
    report, path = _export(model, tmp_path, **options)
    assert_matches_keras(path, model, image_feed(name, shape))
    return report, path


def _image(shape=(13, 13, 3)):
    return keras.Input(shape, name="x")


# -- convolutions, with a BN folded at emission ----------------------------------------
CONV_CASES = {
    "valid": dict(kernel_size=3),
    "same_stride2_odd": dict(kernel_size=3, strides=2, padding="same"),  # pads (0, 1)
    "same_stride2_k4": dict(kernel_size=4, strides=2, padding="same"),  # pads (1, 1)/(1, 2)
    "same_dilated": dict(kernel_size=3, dilation_rate=2, padding="same"),
    "grouped": dict(kernel_size=3, groups=3, padding="same"),
    "no_bias_relu": dict(kernel_size=1, use_bias=False, activation="relu"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_then_bn(tmp_path, case):
    inp = _image((13, 13, 6))
    x = L.Conv2D(9, name="conv", **CONV_CASES[case])(inp)
    x = L.BatchNormalization(name="bn")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (13, 13, 6))
    (record,) = report.records
    if case == "no_bias_relu":  # the activation sits between: the passes decide, not emission
        assert record.action in ("fused", "folded_backward", "kept")
    else:
        assert (record.name, record.action, record.target) == ("bn", "folded_forward", "conv/Conv")
        assert bn_derived_nodes(path) == []
        assert op_counts(path) == {"Transpose": 2, "Conv": 1}


def test_same_padding_is_asymmetric_like_tensorflow(tmp_path):
    """SAME with stride 2 follows TensorFlow: the odd pad goes at the end."""
    inp = _image((13, 13, 2))
    model = keras.Model(inp, L.Conv2D(2, 3, strides=2, padding="same", name="c")(inp))
    _, path = _check(model, tmp_path, (13, 13, 2))
    conv = next(n for n in onnx.load(path).graph.node if n.op_type == "Conv")
    pads = next(list(a.ints) for a in conv.attribute if a.name == "pads")
    # out = ceil(13/2) = 7; total = (7-1)·2 + 3 − 13 = 2 → (1, 1)
    assert pads == [1, 1, 1, 1]
    inp = _image((14, 14, 2))
    model = keras.Model(inp, L.Conv2D(2, 3, strides=2, padding="same", name="c")(inp))
    _, path = _check(model, tmp_path, (14, 14, 2))
    conv = next(n for n in onnx.load(path).graph.node if n.op_type == "Conv")
    # out = 7; total = 12 + 3 − 14 = 1 → (0, 1): the extra pad at the end
    assert next(list(a.ints) for a in conv.attribute if a.name == "pads") == [0, 0, 1, 1]


def test_same_padding_with_unknown_spatial_size(tmp_path):
    """Spatial size unknown when exported: ``auto_pad=SAME_UPPER``, TF's rule at run time."""
    inp = keras.Input((None, None, 3), name="x")
    x = L.Conv2D(4, 3, strides=2, padding="same", name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    model = keras.Model(inp, x)
    report, path = _check(model, tmp_path, (9, 9, 3))
    assert report.records[0].action == "folded_forward"
    assert_matches_keras(path, model, image_feed("x", (12, 10, 3)))


@pytest.mark.parametrize("strides", [1, 2])
def test_depthwise_then_bn(tmp_path, strides):
    inp = _image((12, 12, 4))
    x = L.DepthwiseConv2D(3, strides=strides, depth_multiplier=2, padding="same", name="dw")(inp)
    x = L.BatchNormalization(name="bn")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (12, 12, 4))
    assert [(r.action, r.target) for r in report.records] == [("folded_forward", "dw/Conv")]
    assert bn_derived_nodes(path) == []


def test_separable_then_bn(tmp_path):
    inp = _image((12, 12, 4))
    x = L.SeparableConv2D(7, 3, depth_multiplier=2, padding="same", name="sep")(inp)
    x = L.BatchNormalization(name="bn")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (12, 12, 4))
    assert [(r.action, r.target) for r in report.records] == [("folded_forward", "sep/Conv_1")]
    assert op_counts(path)["Conv"] == 2 and bn_derived_nodes(path) == []


def test_conv1d_causal_then_bn(tmp_path):
    inp = keras.Input((16, 5), name="x")
    x = L.Conv1D(6, 3, padding="causal", dilation_rate=2, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    report, _ = _check(keras.Model(inp, x), tmp_path, (16, 5))
    assert report.records[0].action == "folded_forward"


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_dense_then_bn(tmp_path, rank):
    """Rank 2: Gemm; rank 3: MatMul + Add; rank 4 after a conv: a 1×1 Conv (no Transpose)."""
    shape = {2: (10,), 3: (6, 10), 4: (7, 7, 3)}[rank]
    inp = keras.Input(shape, name="x")
    x = L.Conv2D(10, 3, name="c")(inp) if rank == 4 else inp
    x = L.Dense(8, name="d")(x)
    x = L.BatchNormalization(name="bn")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, shape)
    by_name = {r.name: r for r in report.records}
    assert by_name["bn"].action == "folded_forward" and by_name["bn"].target.startswith("d/")
    assert bn_derived_nodes(path) == []
    if rank == 4:
        assert op_counts(path)["Transpose"] == 2


def test_dense_without_bias_then_bn(tmp_path):
    inp = keras.Input((6, 10), name="x")
    x = L.Dense(8, use_bias=False, name="d")(inp)
    x = L.BatchNormalization(name="bn")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (6, 10))
    assert report.records[0].action == "folded_forward"
    assert bn_derived_nodes(path) == []


# -- batch normalization: every kind, every place ---------------------------------------
def test_bnexport_and_sync_bn_layers_fold(tmp_path):
    from bnexport.layers.batch_normalization import BatchNormalization, SyncBatchNormalization

    inp = _image((9, 9, 3))
    x = L.Conv2D(5, 3, name="c1")(inp)
    x = BatchNormalization(name="ours")(x)
    x = L.Conv2D(4, 1, name="c2")(x)
    x = SyncBatchNormalization(name="sync")(x)
    x = L.Conv2D(4, 1, name="c3")(x)
    x = L.BatchNormalization(synchronized=True, name="keras_sync")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (9, 9, 3))
    assert {r.name: r.action for r in report.records} == {
        "ours": "folded_forward",
        "sync": "folded_forward",
        "keras_sync": "folded_forward",
    }
    assert bn_derived_nodes(path) == []


def test_bn_on_a_non_channel_axis(tmp_path):
    """axis=1 of NHWC (the rows): no fold at emission, the passes keep it exact."""
    inp = _image((6, 6, 3))
    x = L.Conv2D(4, 1, name="c")(inp)
    x = L.BatchNormalization(axis=1, name="rows")(x)
    report, _ = _check(keras.Model(inp, x), tmp_path, (6, 6, 3))
    assert report.records[0].name == "rows"
    assert report.records[0].action in ("fused", "kept")


def test_conv_with_two_consumers_is_not_folded_at_emission(tmp_path):
    inp = _image((8, 8, 3))
    c = L.Conv2D(4, 3, padding="same", name="c")(inp)
    x = L.BatchNormalization(name="bn")(c)
    out = L.Add(name="sum")([x, c])  # the conv's output is read twice
    report, _ = _check(keras.Model(inp, out), tmp_path, (8, 8, 3))
    assert report.records[0].name == "bn" and report.records[0].action != "folded_forward"


def test_fused_norm_plugin_for_a_bn_that_cannot_fold(tmp_path):
    inp = _image((8, 8, 3))
    x = L.BatchNormalization(name="bn_in")(inp)  # on the input, before a padded conv
    x = L.Conv2D(4, 3, padding="same", name="c")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (8, 8, 3), fused_norm="plugin")
    assert report.records[0].action == "fused"
    assert op_counts(path).get("FusedNorm") == 1


# -- activations -----------------------------------------------------------------------
ACTIVATIONS = [
    "linear", "relu", "relu6", "sigmoid", "silu", "swish", "hard_silu", "hard_sigmoid",
    "softmax", "tanh", "elu", "gelu", "softplus",
]  # fmt: skip


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation(tmp_path, name):
    inp = _image((5, 5, 4))
    x = L.Conv2D(6, 1, name="c")(inp)  # stored NCHW: softmax's last axis is ONNX axis 1
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation(name, name="act")(x)
    report, _ = _check(keras.Model(inp, x), tmp_path, (5, 5, 4))
    assert report.records[0].action == "folded_forward"


@pytest.mark.parametrize(
    "layer",
    [
        L.ReLU(), L.ReLU(max_value=6.0), L.ReLU(negative_slope=0.1), L.ReLU(4.0, 0.2),
        L.LeakyReLU(negative_slope=0.3), L.Softmax(axis=1), L.Softmax(axis=-1), L.ELU(0.7),
    ],
    ids=["relu", "relu6", "leaky", "leaky_capped", "leakyrelu", "softmax_rows", "softmax", "elu"],
)  # fmt: skip
def test_activation_layers(tmp_path, layer):
    inp = _image((5, 5, 4))
    x = L.Conv2D(6, 1, name="c")(inp)
    model = keras.Model(inp, layer(x))
    _check(model, tmp_path, (5, 5, 4))


# -- merges and keras.ops in the graph --------------------------------------------------
@pytest.mark.parametrize("merge", ["Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum"])
def test_merge_layers_across_layouts(tmp_path, merge):
    """One operand stored NCHW (after a conv), the other NHWC (the input): aligned."""
    inp = _image((6, 6, 3))
    a = L.Conv2D(3, 1, name="c")(inp)
    out = getattr(L, merge)(name="m")([a, inp])
    _check(keras.Model(inp, out), tmp_path, (6, 6, 3))


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_concatenate_axes(tmp_path, axis):
    inp = _image((6, 6, 3))
    a = L.Conv2D(3, 1, name="ca")(inp)
    b = L.Conv2D(3, 1, name="cb")(inp)
    _check(keras.Model(inp, L.Concatenate(axis=axis)([a, b])), tmp_path, (6, 6, 3))


def test_keras_ops_nodes(tmp_path):
    """keras.ops in a functional graph: add/multiply (MobileNetV3), constants, pad, split."""
    inp = _image((6, 6, 4))
    x = L.Conv2D(4, 1, name="c")(inp)
    x = ops.add(ops.multiply(x, 0.5), 1.0)
    x = ops.relu6(x) / 6.0
    x = ops.pad(x, [[0, 0], [1, 2], [0, 1], [0, 0]])
    a, b = ops.split(x, 2, axis=-1)
    x = ops.concatenate([ops.subtract(a, b), ops.maximum(a, b)], axis=-1)
    x = ops.mean(x, axis=[1, 2])
    _check(keras.Model(inp, x), tmp_path, (6, 6, 4))


def test_keras_ops_transpose_reshape(tmp_path):
    inp = _image((4, 6, 3))
    x = L.Conv2D(5, 1, name="c")(inp)
    x = ops.transpose(x, (0, 3, 1, 2))  # an NCHW view of an NCHW-stored tensor: free
    x = ops.reshape(x, (-1, 5, 24))
    x = ops.matmul(x, np.ones((24, 2), np.float32) / 24)
    _, path = _check(keras.Model(inp, x), tmp_path, (4, 6, 3))
    assert op_counts(path)["Transpose"] == 1


# -- pooling, padding, cropping, reshaping ----------------------------------------------
@pytest.mark.parametrize("cls", ["MaxPooling2D", "AveragePooling2D"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_pooling(tmp_path, cls, padding):
    inp = _image((11, 11, 3))
    x = L.Conv2D(4, 1, name="c")(inp)
    x = getattr(L, cls)(3, strides=2, padding=padding)(x)
    _check(keras.Model(inp, x), tmp_path, (11, 11, 3))


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("cls", ["GlobalAveragePooling2D", "GlobalMaxPooling2D"])
def test_global_pooling(tmp_path, cls, keepdims):
    inp = _image((7, 5, 3))
    x = L.Conv2D(4, 1, name="c")(inp)
    x = getattr(L, cls)(keepdims=keepdims)(x)
    _check(keras.Model(inp, x), tmp_path, (7, 5, 3))


def test_padding_cropping_upsampling(tmp_path):
    inp = _image((8, 9, 3))
    x = L.Conv2D(4, 1, name="c")(inp)
    x = L.ZeroPadding2D(((1, 2), (0, 3)))(x)
    x = L.Cropping2D(((2, 0), (1, 1)))(x)
    a = L.UpSampling2D(2)(x)
    b = L.UpSampling2D((2, 2), interpolation="bilinear")(x)
    _check(keras.Model(inp, L.Add()([a, b])), tmp_path, (8, 9, 3))


@pytest.mark.parametrize("layer", ["flatten", "reshape", "dense4"])
def test_layout_traps_after_a_conv(tmp_path, layer):
    """Flatten/Reshape need Keras's element order: the NCHW tensor goes back to NHWC."""
    inp = _image((4, 5, 3))
    x = L.Conv2D(6, 1, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    if layer == "flatten":
        x = L.Flatten()(x)
    elif layer == "reshape":
        x = L.Reshape((20, 6))(x)
    else:
        x = L.Dense(3)(x)
    x = L.Dense(4, name="head")(x)
    _check(keras.Model(inp, x), tmp_path, (4, 5, 3))


def test_channels_first_model(tmp_path):
    """data_format="channels_first" layers: the tensor is already NCHW, no Transpose."""
    inp = keras.Input((3, 8, 8), name="x")
    x = L.Conv2D(4, 3, padding="same", data_format="channels_first", name="c")(inp)
    x = L.BatchNormalization(axis=1, name="bn")(x)
    x = L.MaxPooling2D(2, data_format="channels_first")(x)
    x = L.ZeroPadding2D(1, data_format="channels_first")(x)
    x = L.GlobalAveragePooling2D(data_format="channels_first")(x)
    report, path = _check(keras.Model(inp, x), tmp_path, (3, 8, 8))
    assert report.records[0].action == "folded_forward"
    assert "Transpose" not in op_counts(path)


def test_flatten_channels_first(tmp_path):
    inp = keras.Input((3, 4, 5), name="x")
    x = L.Conv2D(2, 1, data_format="channels_first", name="c")(inp)
    x = L.Flatten(data_format="channels_first")(x)
    _check(keras.Model(inp, x), tmp_path, (3, 4, 5))


# -- preprocessing and inference no-ops ---------------------------------------------------
def test_rescaling_normalization_dropout(tmp_path):
    inp = _image((6, 6, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    norm = L.Normalization(mean=[0.1, -0.2, 0.3], variance=[0.5, 2.0, 1.5])
    x = norm(x)
    x = L.Dropout(0.5)(x)
    x = L.Conv2D(4, 3, name="c")(x)
    x = L.SpatialDropout2D(0.3)(x)
    x = L.BatchNormalization(name="bn")(x)
    report, _ = _check(keras.Model(inp, x), tmp_path, (6, 6, 3))
    assert {r.name: r.action for r in report.records}["bn"] == "folded_forward"


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("rms", [False, True])
def test_layer_normalization(tmp_path, rms):
    inp = _image((5, 5, 3))
    x = L.Conv2D(6, 1, name="c")(inp)
    ln = L.LayerNormalization(epsilon=1e-3, rms_scaling=rms, name="ln")
    x = ln(x)
    rng = np.random.default_rng(0)
    ln.gamma.assign(rng.uniform(0.5, 1.5, (6,)).astype(np.float32))
    if ln.beta is not None:
        ln.beta.assign(rng.normal(0, 0.3, (6,)).astype(np.float32))
    _check(keras.Model(inp, x), tmp_path, (5, 5, 3))


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_opsets(tmp_path, opset):
    """Reductions change form at opset 18 (axes input); HardSwish needs 14."""
    inp = _image((6, 6, 3))
    x = L.Conv2D(4, 3, name="c")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("hard_silu")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.LayerNormalization()(x)
    _, path = _check(keras.Model(inp, x), tmp_path, (6, 6, 3), opset=opset)
    model = onnx.load(path)
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize(
    "kernel,strides,padding",
    [(3, 2, "valid"), (3, 2, "same"), (4, 2, "same"), (1, 2, "valid"), (2, 3, "same")],
)
def test_conv2d_transpose(tmp_path, kernel, strides, padding):
    """Keras's output length: valid ``in·s + max(k − s, 0)``, same ``in·s``."""
    inp = _image((5, 6, 3))
    x = L.Conv2DTranspose(4, kernel, strides=strides, padding=padding, name="up")(inp)
    x = L.BatchNormalization(name="bn")(x)
    report, _ = _check(keras.Model(inp, x), tmp_path, (5, 6, 3))
    assert report.records[0].name == "bn"


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv2d_transpose_output_padding(tmp_path, padding):
    inp = _image((5, 6, 3))
    x = L.Conv2DTranspose(4, 3, strides=2, padding=padding, output_padding=1, name="up")(inp)
    _check(keras.Model(inp, x), tmp_path, (5, 6, 3))
