"""bnexport.sample_inputs.make_inputs: the one generator of verify and parity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from bnexport.errors import UsageError
from bnexport.sample_inputs import make_inputs


@dataclass
class Info:
    name: str
    shape: tuple | list | None
    dtype: object


def test_shapes_dtypes_ranges_and_determinism():
    infos = [
        Info("image", (None, 4, 4, 3), np.float32),
        Info("vec", [None, 5], "float"),  # TensorFlow's name for float32
        Info("ids", (None, 6), np.int64),
        Info("flag", (None,), np.bool_),
        Info("fixed", (2, 3), np.float16),
    ]
    a = make_inputs(infos, 7, seed=3)
    b = make_inputs(infos, 7, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].shape == (7, 4, 4, 3) and a["image"].dtype == np.float32
    assert a["image"].min() >= -1.0 and a["image"].max() < 1.0  # images: uniform [-1, 1)
    assert a["vec"].shape == (7, 5) and a["vec"].dtype == np.float32
    assert abs(float(a["vec"].std()) - 1.0) < 0.5  # standard normal
    assert a["ids"].dtype == np.int64 and a["ids"].min() >= 0 and a["ids"].max() < 10
    assert a["flag"].dtype == np.bool_ and a["flag"].shape == (7,)
    assert a["fixed"].shape == (2, 3) and a["fixed"].dtype == np.float16  # static batch kept
    c = make_inputs(infos, 7, seed=4)
    assert not np.array_equal(a["image"], c["image"])


def test_dynamic_dims_are_refused_or_filled():
    info = Info("seq", (None, None, 8), np.float32)
    with pytest.raises(UsageError, match="'seq'.*dynamic dimensions besides the batch"):
        make_inputs([info], 2)
    assert make_inputs([info], 2, fill_dynamic=5)["seq"].shape == (2, 5, 8)
    with pytest.raises(UsageError, match="no shape"):
        make_inputs([Info("x", None, np.float32)], 2)
    with pytest.raises(UsageError, match=">= 1"):
        make_inputs([Info("x", (None, 2), np.float32)], 0)
