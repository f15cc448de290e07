"""MahalanobisDetector: the formula, off-manifold noise on MNIST, and its cost.

Cost measured on the shared 2-core dev machine (timeit, median of 15 repeats,
MNIST 28×28×1, n_components 50, float64; other engineers' jobs running):

=========================  ==========  ===========
path                        batch 1     batch 64
=========================  ==========  ===========
validation ``check``        ~7 µs       ~0.2 µs/sample
mahalanobis ``score``       ~17 µs      ~5 µs/sample (one BLAS thread)
check + detect              ~30 µs      ~5 µs/sample (one BLAS thread)
=========================  ==========  ===========

With OpenBLAS' default of one thread per core, batch 64 on a busy 2-core
machine took 3–7 ms (threads fighting over cores); run the gateway with
``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import threading
import timeit

import numpy as np
import pytest

from detectors.base import DetectorError
from detectors.mahalanobis import MahalanobisDetector, mahalanobis_scores
from detectors.validation import InputValidator


@pytest.fixture(scope="module")
def detector(mnist) -> MahalanobisDetector:
    return MahalanobisDetector().fit(mnist.x_train).calibrate(mnist.x_validation, 0.01)


def test_with_every_component_kept_it_is_the_classical_mahalanobis_distance():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(4, 4))
    reference = rng.normal(size=(500, 4)) @ mixing
    detector = MahalanobisDetector(n_components=4, variance_floor=1e-9).fit(reference)
    x = rng.normal(size=(20, 4)) @ mixing
    centred = x - reference.mean(axis=0)
    precision = np.linalg.inv(np.cov(reference, rowvar=False))
    expected = np.sqrt(np.einsum("ni,ij,nj->n", centred, precision, centred))
    np.testing.assert_allclose(detector.score(x), expected, rtol=1e-6)


def test_the_score_adds_the_residual_normalised_per_feature():
    # Reference data varies along feature 0 only: one component explains it
    # all, the residual variance is 0 everywhere, so the floor's unit falls
    # back to the mean variance per feature, and feature 1 weighs 1 / floor.
    rng = np.random.default_rng(2)
    reference = np.zeros((100, 2))
    reference[:, 0] = rng.normal(size=100)
    detector = MahalanobisDetector(n_components=1, variance_floor=0.5).fit(reference)
    variance = reference[:, 0].var(ddof=1)
    floor = 0.5 * (variance + 0.0) / 2
    x = np.array([[reference[:, 0].mean() + 1.0, 0.3]])
    expected = np.sqrt(1.0 / (variance + floor) + 0.3**2 / floor)
    np.testing.assert_allclose(detector.score(x), [expected], rtol=1e-9)


def test_components_are_orthonormal_and_capped_by_the_sample_count():
    reference = np.random.default_rng(3).normal(size=(10, 30))
    detector = MahalanobisDetector(n_components=50).fit(reference)
    assert detector.components_.shape == (30, 9)
    np.testing.assert_allclose(detector.components_.T @ detector.components_, np.eye(9), atol=1e-12)


def test_catches_gaussian_noise_on_mnist_digits_at_one_percent_fpr(detector, mnist):
    noisy = np.clip(mnist.x_test + np.random.default_rng(4).normal(0, 0.1, mnist.x_test.shape), 0, 1)
    flagged = detector.detect(noisy.astype(np.float32)).flagged
    assert flagged.mean() >= 0.99
    assert detector.detect(mnist.x_test).flagged.mean() <= 0.03


def test_catches_fgsm_like_sign_noise_that_a_projection_alone_misses(detector, mnist):
    """±0.1 on every pixel (clipped), the shape of an L∞ attack like FGSM at ε = 0.1."""
    signs = np.random.default_rng(5).choice([-1.0, 1.0], mnist.x_test.shape)
    perturbed = np.clip(mnist.x_test + 0.1 * signs, 0, 1).astype(np.float32)
    assert detector.detect(perturbed).flagged.mean() >= 0.99


def test_nan_scores_infinite(detector, mnist):
    batch = mnist.x_test[:2].copy()
    batch[1, 3, 3, 0] = np.nan
    scores = detector.score(batch)
    assert np.isfinite(scores[0])
    assert scores[1] == np.inf


def test_nan_and_inf_score_infinite_in_a_batch_scored_in_reused_scratch(detector, mnist):
    batch = mnist.x_test[:40].copy()
    batch[5, 3, 3, 0] = np.nan
    batch[30, 10, 10, 0] = np.inf
    batch[31, 0, 0, 0] = -np.inf
    with np.errstate(invalid="ignore"):  # inf - inf on the way, as before scratch was reused
        scores = detector.score(batch)
    assert scores[[5, 30, 31]].tolist() == [np.inf] * 3
    assert np.isfinite(np.delete(scores, [5, 30, 31])).all()


def learned(detector: MahalanobisDetector) -> tuple[np.ndarray, ...]:
    return detector.mean_, detector.components_, detector.component_weights_, detector.residual_weights_


@pytest.mark.parametrize("batch", [1, 2, 20, 21, 64, 32, 257])
def test_scores_from_reused_scratch_equal_the_allocating_function(detector, mnist, batch):
    """Batches from 21 MNIST samples up are scored in per-thread scratch, grown as batches grow."""
    x = np.concatenate([mnist.x_test, mnist.x_test])[:batch]
    expected = mahalanobis_scores(x.reshape(batch, -1).astype(np.float64), *learned(detector))
    np.testing.assert_allclose(detector.score(x), expected, rtol=1e-12)


def test_threads_scoring_at_once_do_not_share_scratch(detector, mnist):
    """The gateway scores small batches on its event loop and large ones in a worker thread."""
    batches = [mnist.x_test[i * 40 : (i + 1) * 40] for i in range(4)]
    expected = [detector.score(b) for b in batches]
    results: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        results[i] = [detector.score(batches[i]) for _ in range(30)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, scores in results.items():
        for got in scores:
            np.testing.assert_array_equal(got, expected[i])


def test_refitting_or_loading_scores_with_the_new_arrays(mnist, tmp_path):
    first = MahalanobisDetector(n_components=5).fit(mnist.x_train[:500]).calibrate(mnist.x_validation, 0.05)
    x = mnist.x_test[:30]
    first.score(x)  # builds the cached scorer from the first fit
    first.fit(mnist.x_train[500:1000])
    expected = mahalanobis_scores(x.reshape(30, -1).astype(np.float64), *learned(first))
    np.testing.assert_allclose(first.score(x), expected, rtol=1e-12)

    other = MahalanobisDetector(n_components=8).fit(mnist.x_train[:300]).calibrate(mnist.x_validation, 0.05)
    first.calibrate(mnist.x_validation, 0.05).save(tmp_path / "first")
    other.save(tmp_path / "other")
    loaded = MahalanobisDetector.load(tmp_path / "other")
    np.testing.assert_array_equal(loaded.score(x), other.score(x))


def test_samples_of_another_size_are_refused(detector):
    with pytest.raises(DetectorError) as caught:
        detector.score(np.zeros((2, 27, 27, 1), dtype=np.float32))
    assert str(caught.value) == (
        "mahalanobis: samples have 729 features (shape [27, 27, 1]); the detector was fitted on 784"
    )


def test_reference_data_with_nan_is_refused():
    reference = np.zeros((5, 3))
    reference[2, 1] = np.nan
    with pytest.raises(DetectorError, match="reference data holds NaN or Inf"):
        MahalanobisDetector().fit(reference)


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(DetectorError, match="n_components must be an integer >= 1, got 0"):
        MahalanobisDetector(n_components=0)
    with pytest.raises(DetectorError, match="variance_floor must be > 0, got 0.0"):
        MahalanobisDetector(variance_floor=0.0)


def test_validation_and_mahalanobis_at_batch_1_stay_far_inside_the_300_us_budget(detector, mnist):
    """The gateway's budget for the whole validation + Mahalanobis path is 0.3 ms p50 per request."""
    validator = InputValidator(dtype="float32", shape=[28, 28, 1]).fit(mnist.x_train)
    validator.calibrate(mnist.x_validation, 0.01)
    x = mnist.x_test[:1].copy()

    def request() -> None:
        validator.check("images", x)
        detector.detect(x)

    per_call_s = min(timeit.repeat(request, number=50, repeat=7)) / 50
    assert per_call_s < 300e-6
