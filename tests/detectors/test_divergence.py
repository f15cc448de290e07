"""MagNet's divergence detector: JSD between the model's softened answers on x and on AE(x)."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import DetectorError
from detectors.divergence import MagnetDivergence, jensen_shannon, softened
from gateway.model.data import MnistSplit
from tests.detectors.conftest import AUTOENCODER_NAME


def test_softening_probabilities_equals_softening_their_logits() -> None:
    logits = np.array([[2.0, 1.0, -3.0], [0.0, 0.0, 9.0]])
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softened(probabilities, 10.0), softened(logits, 10.0, logits=True), rtol=1e-12)


def test_scores_are_zero_for_the_same_answer_and_ln2_at_most() -> None:
    detector = MagnetDivergence()
    same = np.array([[0.9, 0.1], [0.5, 0.5]])
    assert detector.score_outputs(same, same) == pytest.approx([0.0, 0.0])
    disjoint = jensen_shannon(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert disjoint == pytest.approx([np.log(2)])


def test_a_changed_answer_scores_higher_at_a_lower_temperature() -> None:
    x, ae = np.array([[0.98, 0.02]]), np.array([[0.3, 0.7]])
    cool, hot = MagnetDivergence(temperature=10.0), MagnetDivergence(temperature=40.0)
    assert cool.score_outputs(x, ae)[0] > hot.score_outputs(x, ae)[0] > 0.0


def test_one_autoencoder_call_and_one_model_call_on_x_and_its_reconstruction(
    mnist: MnistSplit, predictor
) -> None:
    detector = MagnetDivergence().fit(mnist.x_train[:50], predictor)
    predictor.calls.clear()
    detector.score(mnist.x_test[:7], predictor)
    assert predictor.calls == [(AUTOENCODER_NAME, (7, 28, 28, 1)), ("", (14, 28, 28, 1))]


def test_noise_scores_above_benign_digits(mnist: MnistSplit, predictor) -> None:
    detector = MagnetDivergence().fit(mnist.x_train[:50], predictor)
    detector.calibrate(mnist.x_validation, 0.05, predictor)
    noise = np.random.default_rng(3).random((50, 28, 28, 1), dtype=np.float32)
    assert np.mean(detector.detect(noise, predictor).flagged) > 0.5
    assert np.mean(detector.detect(mnist.x_test[:500], predictor).flagged) < 0.15


def test_temperature_must_be_positive() -> None:
    with pytest.raises(DetectorError, match="magnet_jsd: temperature must be > 0, got 0"):
        MagnetDivergence(temperature=0)
