"""bn_scale_shift against the textbook formula, and its input validation."""

from __future__ import annotations

import numpy as np
import pytest

from bnexport.errors import ExportError
from bnexport.export.fold_math import bn_scale_shift


def _params(c: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=c),
        rng.normal(size=c),
        rng.normal(size=c) * 3,
        rng.uniform(0.1, 2.0, size=c),
    )


def test_matches_batch_norm_formula_in_float64():
    gamma, beta, mean, var = _params()
    eps = 1e-3
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    assert scale.dtype == np.float64 and shift.dtype == np.float64
    x = np.random.default_rng(1).normal(size=(7, 5))
    expected = gamma * (x - mean) / np.sqrt(var + eps) + beta
    np.testing.assert_allclose(x * scale + shift, expected, rtol=1e-12, atol=1e-12)


def test_missing_gamma_beta_mean_identity_affine():
    _, _, mean, var = _params()
    scale, shift = bn_scale_shift(None, None, mean, var, 0.0)
    np.testing.assert_allclose(scale, 1 / np.sqrt(var), rtol=1e-15)
    np.testing.assert_allclose(shift, -mean / np.sqrt(var), rtol=1e-15)


def test_float32_inputs_are_computed_in_float64():
    # var + eps with eps far below float32 resolution of var must still count.
    var = np.array([1.0], np.float32)
    scale, _ = bn_scale_shift(None, None, np.zeros(1, np.float32), var, 1e-9)
    assert scale[0] == pytest.approx(1 / np.sqrt(1 + 1e-9), rel=1e-15)
    assert scale[0] != 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mean", np.nan, "moving_mean has 1 non-finite"),
        ("var", np.inf, "moving_variance has 1 non-finite"),
        ("var", -0.5, "moving_variance is negative at channel 2"),
        ("gamma", np.nan, "gamma has 1 non-finite"),
    ],
)
def test_bad_statistics_name_the_layer_and_field(field, value, message):
    gamma, beta, mean, var = _params()
    arrays = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    arrays[field][2] = value
    with pytest.raises(ExportError, match=f"block3_bn: {message}"):
        bn_scale_shift(
            arrays["gamma"], arrays["beta"], arrays["mean"], arrays["var"], 1e-3, name="block3_bn"
        )


def test_shape_mismatch_is_reported():
    gamma, beta, mean, var = _params()
    with pytest.raises(ExportError, match=r"bn: gamma has shape \(4,\), expected \(5,\)"):
        bn_scale_shift(gamma[:4], beta, mean, var, 1e-3, name="bn")


def test_zero_variance_and_zero_epsilon_is_an_error():
    with pytest.raises(ExportError, match="variance \\+ epsilon is 0 at channel 0"):
        bn_scale_shift(None, None, np.zeros(2), np.zeros(2), 0.0, name="bn")
