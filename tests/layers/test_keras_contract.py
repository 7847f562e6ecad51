"""Keras's own expectations for its BatchNormalization hold for ours.

Mirrors keras/src/layers/normalization/batch_normalization_test.py (Keras 3.15):
``run_layer_test`` (shapes, weight counts, losses, masking support, config and
serialization round trip, symbolic/eager calls, mixed precision), correctness of the
normalized output, masked statistics, the trainable flag, renorm expectations.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers
from keras.src import testing

from bnexport.layers.batch_normalization import BatchNormalization


class TestKerasContract(testing.TestCase):
    def test_bn_basics(self):
        for init_kwargs, shape, trainable, losses in [
            ({"center": True, "scale": True}, (2, 3), 2, 0),
            ({"center": False, "scale": False}, (2, 3), 0, 0),
            (
                {"beta_regularizer": "l2", "gamma_regularizer": "l2"},
                (2, 4, 4, 3),
                2,
                2,
            ),
            ({"axis": 1, "fused": True}, (2, 3, 4, 4), 2, 0),
            ({"virtual_batch_size": 2}, (4, 4, 4, 3), 2, 0),
        ]:
            self.run_layer_test(
                BatchNormalization,
                init_kwargs=init_kwargs,
                call_kwargs={"training": True},
                input_shape=shape,
                expected_output_shape=shape,
                expected_num_trainable_weights=trainable,
                expected_num_non_trainable_weights=2,
                expected_num_seed_generators=0,
                expected_num_losses=losses,
                supports_masking=True,
            )

    def test_renorm_basics(self):
        for shape, clipping in [((2, 3), None), ((2, 4, 4, 3), {"rmax": 3.0, "rmin": 0.3})]:
            self.run_layer_test(
                BatchNormalization,
                init_kwargs={"renorm": True, "renorm_clipping": clipping},
                call_kwargs={"training": True},
                input_shape=shape,
                expected_output_shape=shape,
                expected_num_trainable_weights=2,
                expected_num_non_trainable_weights=5,
                expected_num_seed_generators=0,
                expected_num_losses=0,
                supports_masking=True,
            )

    def test_correctness(self):
        for axis in (-1, 1):
            for input_shape in ((5, 2, 3), (5, 3, 3, 2)):
                for mm_init in ("zeros", "ones"):
                    for mv_init in ("zeros", "ones"):
                        layer = BatchNormalization(
                            axis=axis,
                            momentum=0,
                            moving_mean_initializer=mm_init,
                            moving_variance_initializer=mv_init,
                        )
                        x = np.random.normal(loc=5.0, scale=10.0, size=input_shape)
                        out = x
                        for _ in range(3):
                            out = layer(out, training=True)
                        bshape = [1] * len(input_shape)
                        bshape[axis] = input_shape[axis]
                        out = np.asarray(out) - np.reshape(layer.beta.numpy(), bshape)
                        out = out / np.reshape(layer.gamma.numpy(), bshape)
                        red = tuple(
                            i for i in range(len(input_shape)) if i != axis % len(input_shape)
                        )
                        self.assertAllClose(np.mean(out, axis=red), 0.0, atol=1e-3)
                        self.assertAllClose(np.std(out, axis=red), 1.0, atol=1e-3)
                        self.assertAllClose(layer.moving_mean, 0.0, atol=1e-3)
                        self.assertAllClose(layer.moving_variance, 1.0, atol=1e-3)
                        inference_out = layer(x, training=False)
                        training_out = layer(x, training=True)
                        self.assertNotAllClose(inference_out, training_out)
                        training_out = layer(x, training=True)
                        inference_out = layer(x, training=False)
                        self.assertAllClose(inference_out, training_out, atol=1e-5)

    def test_input_fully_masked(self):
        for synchronized in (False, True):
            norm = BatchNormalization(scale=False, center=False, synchronized=synchronized)
            x = np.zeros((4, 5))
            y = norm(x, mask=np.zeros((4,), np.float32), training=True)
            self.assertAllClose(y, np.zeros_like(x, dtype=np.float32))
            self.assertAllClose(norm.moving_mean, np.zeros(5))
            self.assertAllClose(norm.moving_variance, np.ones(5))

    def test_batchnorm_ignore_masked_values(self):
        for run_eagerly in (True, False):
            for mask_value in (0.0, 0.1, 1):
                padded = np.array(
                    [[[1, 5], [2, 5], [mask_value] * 2, [mask_value] * 2] for _ in range(10)],
                    dtype="float32",
                )
                inputs = layers.Input((None, 2))
                masked = layers.Masking(mask_value=mask_value)(inputs)
                normed = BatchNormalization(momentum=0.0)(masked)
                model = keras.Model(inputs, normed)
                model.compile("rmsprop", loss="mse", run_eagerly=run_eagerly)
                model.fit(x=padded, y=padded, batch_size=10, epochs=2, verbose=0)
                self.assertAllClose(model.layers[2].moving_mean, [1.5, 5.0])
                self.assertAllClose(model.layers[2].moving_variance, [0.25, 0.0])

    def test_trainable_behavior(self):
        layer = BatchNormalization(axis=-1, momentum=0.8, epsilon=1e-7)
        layer.build((1, 4, 4, 3))
        layer.trainable = False
        self.assertEqual(len(layer.weights), 4)
        self.assertEqual(len(layer.trainable_weights), 0)
        self.assertEqual(len(layer.non_trainable_weights), 4)
        x = np.random.normal(loc=5.0, scale=10.0, size=(200, 4, 4, 3))
        self.assertAllClose(layer(x, training=True), x, atol=1e-4)
        layer.trainable = True
        self.assertEqual(len(layer.trainable_weights), 2)
        self.assertEqual(len(layer.non_trainable_weights), 2)
        for _ in range(10):
            out = layer(x, training=True)
        out = (np.asarray(out) - layer.beta.numpy()) / layer.gamma.numpy()
        self.assertAllClose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-3)
        self.assertAllClose(np.std(out, axis=(0, 1, 2)), 1.0, atol=1e-3)

    def test_masked_broadcast_normalization(self):
        layer = BatchNormalization(axis=-1, momentum=0.0, epsilon=1e-3)
        y = layer(np.ones((1, 2, 3, 4)), training=True, mask=np.ones((1, 2, 1)))
        self.assertAllClose(y, np.zeros((1, 2, 3, 4)), atol=1e-6)
        self.assertAllClose(layer.moving_mean, np.ones((4,)), atol=1e-6)
        self.assertAllClose(layer.moving_variance, np.zeros((4,)), atol=1e-6)

    def test_renorm_stddev_initializer(self):
        layer = BatchNormalization(
            renorm=True, moving_variance_initializer=keras.initializers.Constant(4.0)
        )
        layer.build((None, 5))
        self.assertAllClose(layer.moving_stddev, np.full((5,), 2.0), atol=1e-6)
        self.assertAllClose(layer.renorm_stddev, np.full((5,), 2.0), atol=1e-6)

    def test_renorm_inference_equals_plain(self):
        bn, bn_renorm = BatchNormalization(), BatchNormalization(renorm=True)
        bn.build((None, 10))
        bn_renorm.build((None, 10))
        for attr in ("gamma", "beta", "moving_mean", "moving_variance"):
            getattr(bn, attr).assign(np.random.normal(size=(10,)) ** 2)
            getattr(bn_renorm, attr).assign(getattr(bn, attr))
        x = np.random.normal(size=(4, 10))
        self.assertAllClose(bn(x, training=False), bn_renorm(x, training=False), atol=1e-5)

    def test_same_outputs_as_keras_layer(self):
        for shape, axis in (((6, 4), -1), ((4, 3, 5, 5), 1), ((4, 5, 5, 3), -1)):
            ours = BatchNormalization(axis=axis, momentum=0.6)
            theirs = layers.BatchNormalization(axis=axis, momentum=0.6)
            x = np.random.normal(2.0, 3.0, size=shape).astype("float32")
            for _ in range(2):
                self.assertAllClose(ours(x, training=True), theirs(x, training=True), atol=1e-5)
            self.assertAllClose(ours.moving_mean, theirs.moving_mean, atol=1e-6)
            self.assertAllClose(ours.moving_variance, theirs.moving_variance, atol=1e-5)
            self.assertAllClose(ours(x), theirs(x), atol=1e-5)
