"""get_config/from_config and .keras save/load (safe mode) round trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from bn_reference import randomize

import bnexport
from bnexport.layers.batch_normalization import (
    BatchNormalization,
    SyncBatchNormalization,
)

FULL = {
    "axis": [1, 3],
    "momentum": 0.9,
    "epsilon": 1e-4,
    "center": False,
    "scale": True,
    "gamma_initializer": keras.initializers.Constant(2.0),
    "moving_variance_initializer": "ones",
    "gamma_regularizer": keras.regularizers.L2(1e-3),
    "gamma_constraint": keras.constraints.NonNeg(),
    "renorm": True,
    "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
    "renorm_momentum": 0.8,
    "synchronized": False,
    "fused": False,
    "virtual_batch_size": 2,
    "ema_update": "skip",
    "name": "bn_full",
}


def test_config_round_trip_keeps_every_argument():
    layer = BatchNormalization(**FULL)
    config = layer.get_config()
    clone = BatchNormalization.from_config(config)
    assert clone.get_config() == config
    for key in (
        "axis",
        "momentum",
        "epsilon",
        "center",
        "renorm_clipping",
        "renorm_momentum",
        "fused",
        "virtual_batch_size",
        "ema_update",
    ):
        assert config[key] == FULL[key], key
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is BatchNormalization
    assert restored.get_config() == config


def test_data_format_and_axis_none_round_trip():
    layer = BatchNormalization(axis=None, data_format="channels_first")
    clone = BatchNormalization.from_config(layer.get_config())
    clone.build((2, 3, 4, 4))
    assert clone.axis == [1] and clone.data_format == "channels_first"


def test_public_names_are_the_layer_classes():
    assert bnexport.BatchNormalization is BatchNormalization
    assert bnexport.SyncBatchNormalization is SyncBatchNormalization
    assert keras.saving.get_registered_name(BatchNormalization) == "bnexport>BatchNormalization"


def _model(**bn_kwargs):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = BatchNormalization(name="bn1", **bn_kwargs)(x)
    x = keras.layers.ReLU()(x)
    x = SyncBatchNormalization(axis=[2, 3], name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5)(x)
    x = BatchNormalization(name="bn3", momentum=0.5)(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize(
    "bn_kwargs",
    [
        {},
        {"renorm": True, "renorm_clipping": {"rmax": 3.0}},
        {"virtual_batch_size": 4},
        {"axis": None, "data_format": "channels_last", "fused": True},
    ],
)
def test_keras_file_round_trip_identical_outputs(tmp_path, bn_kwargs, rng):
    model = _model(**bn_kwargs)
    for layer in model.layers:
        if isinstance(layer, BatchNormalization):
            randomize(layer, seed=len(layer.name))
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    model(x, training=True)  # move the statistics away from the initial values
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())
    np.testing.assert_array_equal(model(x, training=True).numpy(), loaded(x, training=True).numpy())
    assert isinstance(loaded.get_layer("bn2"), SyncBatchNormalization)
    assert loaded.get_layer("bn1").get_config() == model.get_layer("bn1").get_config()
