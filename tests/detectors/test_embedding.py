"""The shared embedding: PCA or a seeded random projection, saved without pickle."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import ArtefactError, DetectorError, NotCalibrated
from detectors.embedding import Embedding


def test_pca_components_are_orthonormal_and_ordered_by_variance(mnist):
    embedding = Embedding(n_components=16).fit(mnist.x_train)
    components = embedding.components_.astype(np.float64)
    np.testing.assert_allclose(components.T @ components, np.eye(16), atol=1e-4)
    variances = embedding.transform(mnist.x_train).var(axis=0)
    assert np.all(np.diff(variances) <= 1e-4)


def test_transform_gives_float32_n_by_k_for_any_sample_shape(mnist):
    embedding = Embedding(n_components=8).fit(mnist.x_train[:200])
    assert embedding.transform(mnist.x_test[:5]).shape == (5, 8)
    assert embedding.transform(mnist.x_test[:5].reshape(5, -1)).dtype == np.float32
    assert embedding.transform(mnist.x_test[:0]).shape == (0, 8)


def test_a_random_projection_roughly_keeps_distances(mnist):
    embedding = Embedding(method="random", n_components=256, seed=3).fit(mnist.x_train[:100])
    x = mnist.x_test[:40].reshape(40, -1)
    z = embedding.transform(x)
    original = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(40, 1)]
    projected = np.linalg.norm(z[:, None] - z[None], axis=-1)[np.triu_indices(40, 1)]
    ratio = projected / original
    assert 0.8 < ratio.min() and ratio.max() < 1.2


def test_the_seed_decides_the_random_projection(mnist):
    a = Embedding(method="random", seed=1).fit(mnist.x_train[:50])
    b = Embedding(method="random", seed=1).fit(mnist.x_train[:50])
    c = Embedding(method="random", seed=2).fit(mnist.x_train[:50])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_save_then_load_transforms_bit_identically(mnist, tmp_path):
    embedding = Embedding(n_components=12).fit(mnist.x_train[:300])
    embedding.save(tmp_path)
    loaded = Embedding.load(tmp_path)
    assert loaded.get_params() == embedding.get_params()
    np.testing.assert_array_equal(loaded.transform(mnist.x_test[:20]), embedding.transform(mnist.x_test[:20]))


def test_load_refuses_pickled_arrays(mnist, tmp_path):
    Embedding(n_components=4).fit(mnist.x_train[:50]).save(tmp_path)
    np.savez(tmp_path / "arrays.npz", mean_=np.array([object()], dtype=object), components_=np.zeros((1, 1)))
    with pytest.raises(ArtefactError, match="cannot load arrays"):
        Embedding.load(tmp_path)


def test_errors_say_what_to_do(mnist):
    with pytest.raises(NotCalibrated, match=r"embedding is not fitted; call fit\(x_ref\) first"):
        Embedding().transform(mnist.x_test[:1])
    with pytest.raises(DetectorError, match="method must be one of pca, random"):
        Embedding(method="umap")
    embedding = Embedding(n_components=4).fit(mnist.x_train[:50])
    with pytest.raises(DetectorError, match="samples have 10 features; it was fitted on 784"):
        embedding.transform(np.zeros((1, 10)))
