"""The built-in default data set: scikit-learn's 8×8 handwritten digits.

It ships inside scikit-learn (no download), which makes it the data of the
quickstart, the tests and the benchmarks that need a real classification task.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DigitsSplit(NamedTuple):
    """Train/test arrays: images ``[N, 8, 8, 1]`` float32 in [0, 1], labels ``[N]`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Load the 1,797 digits, scaled to [0, 1], shuffled and split with ``seed``.

    Args:
        test_fraction: share of the samples held out for evaluation.
        seed: seed of the shuffle, so every run sees the same split.

    Returns:
        A ``DigitsSplit`` with NHWC images (``[N, 8, 8, 1]``, float32) and int64 labels.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    images = (data.images.astype(np.float32) / 16.0)[..., None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_test = int(round(len(labels) * test_fraction))
    return DigitsSplit(images[n_test:], labels[n_test:], images[:n_test], labels[:n_test])
