"""The margin detector: high at the decision boundary, low on confident benign digits."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import DetectorError
from detectors.margin import MarginDetector
from gateway.model.data import MnistSplit


def boundary_points(classify, a: np.ndarray, b: np.ndarray, steps: int = 30) -> np.ndarray:
    """For each pair of digits with different predicted classes, the blend where the label flips.

    Bisection on t in (1 − t)·a + t·b: the point returned is on a's side, within
    2^-steps of the flip, which is where minimum-distortion attacks (CW κ = 0,
    DeepFool) stop.
    """
    out = []
    for x0, x1 in zip(a, b, strict=True):
        c0 = classify(x0[None]).argmax()
        if classify(x1[None]).argmax() == c0:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            if classify(((1 - mid) * x0 + mid * x1)[None]).argmax() == c0:
                lo = mid
            else:
                hi = mid
        out.append((1 - lo) * x0 + lo * x1)
    return np.stack(out).astype(np.float32)


def test_points_at_the_decision_boundary_score_above_benign_digits(mnist: MnistSplit, classify) -> None:
    predictor = lambda _name, batch: classify(batch)  # noqa: E731
    detector = (
        MarginDetector().fit(mnist.x_train[:200], predictor).calibrate(mnist.x_validation, 0.05, predictor)
    )
    edge = boundary_points(classify, mnist.x_test[:60], mnist.x_test[60:120])
    assert len(edge) >= 30
    benign = detector.score(mnist.x_test[:500], predictor)
    at_edge = detector.score(edge, predictor)
    assert np.median(at_edge) > np.quantile(benign, 0.95)
    assert np.mean(detector.detect(edge, predictor).flagged) > 0.9


def test_scores_are_one_minus_the_gap_of_the_two_largest_probabilities() -> None:
    outputs = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0], [np.nan, 0.5, 0.5]])
    scores = MarginDetector().score_outputs(outputs)
    assert scores[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert scores[3] == np.inf


def test_logits_need_softmax_true(mnist: MnistSplit, classify) -> None:
    logits = lambda _name, batch: np.log(classify(batch)) * 3.0  # noqa: E731
    with pytest.raises(DetectorError, match="does not look like probabilities"):
        MarginDetector(output="logits").fit(mnist.x_train[:50], logits)
    detector = MarginDetector(output="logits", softmax=True).fit(mnist.x_train[:50], logits)
    assert detector.n_classes_ == 10
