"""The demo's data: the bundled MNIST digits and their seeded split."""

from __future__ import annotations

import numpy as np

from gateway.model.data import load_mnist_digits, split_mnist


def test_the_split_covers_all_5000_digits_once() -> None:
    split = split_mnist()
    assert split.sizes() == {"train": 3500, "validation": 500, "test": 1000}
    images, labels = load_mnist_digits()
    x = np.concatenate([split.x_train, split.x_validation, split.x_test])
    y = np.concatenate([split.y_train, split.y_validation, split.y_test])
    assert np.array_equal(np.bincount(y), np.bincount(labels))
    for digit in range(10):  # the same images per class, just reordered
        np.testing.assert_allclose(x[y == digit].sum(axis=0), images[labels == digit].sum(axis=0), rtol=1e-5)


def test_images_are_float32_in_unit_range_with_int_labels() -> None:
    split = split_mnist()
    assert split.x_test.dtype == np.float32 and split.x_test.shape[1:] == (28, 28, 1)
    assert split.x_test.min() >= 0.0 and split.x_test.max() <= 1.0 and split.x_test.max() > 0.5
    assert split.y_test.dtype == np.int64 and set(np.unique(split.y_test)) == set(range(10))


def test_the_same_seed_gives_the_same_split_and_another_seed_another() -> None:
    first, again, other = split_mnist(7), split_mnist(7), split_mnist(8)
    assert np.array_equal(first.y_test, again.y_test) and np.array_equal(first.x_test, again.x_test)
    assert not np.array_equal(first.y_test, other.y_test)


def test_every_split_holds_every_class() -> None:
    split = split_mnist()
    for labels in (split.y_train, split.y_validation, split.y_test):
        assert np.bincount(labels, minlength=10).min() > 20
