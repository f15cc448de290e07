"""Shared data and predictors for the detector tests.

The data is the real bundled MNIST split (``gateway.model.data``): detectors
are fitted on ``x_train`` (3,500 digits), calibrated on ``x_validation`` (500)
and checked on ``x_test`` (1,000), all float32 ``(n, 28, 28, 1)`` in [0, 1].

Predictors are deterministic numpy stand-ins for models, cheap enough for
every test: a small classifier fitted here on the training split (the
protected model, for feature squeezing; see ``fit_classifier``) and a PCA
reconstruction (the autoencoder). The real autoencoder is exercised in ``test_autoencoder.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

import detectors  # noqa: F401  (registers every detector)
from detectors.base import Predictor
from gateway.model.data import MnistSplit, split_mnist

AUTOENCODER_NAME = "mnist_autoencoder"


@pytest.fixture(scope="session")
def mnist() -> MnistSplit:
    return split_mnist()


def fit_classifier(x: np.ndarray, y: np.ndarray, width: int = 1000, temperature: float = 10.0) -> Callable:
    """A small nonlinear classifier in closed form; returns probabilities(batch) float32 (n, 10).

    Random ReLU features (seeded) and ridge regression onto one-hot labels,
    softmax of ``temperature`` × the regression output (about 91 % test
    accuracy). Trained on the digits and on their squeezed copies (1-bit, 2×2
    median) so that, like a real CNN (and unlike a plain linear model), it
    mostly predicts a benign digit the same whether squeezed or not: the
    premise of feature squeezing.
    """
    from detectors.squeeze import median_filter, reduce_bit_depth

    x = np.concatenate([x, reduce_bit_depth(x, 1), median_filter(x, 2)])
    y = np.tile(y, 3)
    rng = np.random.default_rng(0)
    features_in = math.prod(x.shape[1:])
    projection = rng.normal(0.0, 1.0 / math.sqrt(features_in), (features_in, width))
    offset = rng.normal(0.0, 0.5, width)

    def features(batch: np.ndarray) -> np.ndarray:
        return np.maximum(batch.reshape(len(batch), -1).astype(np.float64) @ projection + offset, 0.0)

    train = features(x)
    weights = np.linalg.solve(train.T @ train + np.eye(width), train.T @ np.eye(10)[y])

    def probabilities(batch: np.ndarray) -> np.ndarray:
        logits = temperature * (features(batch) @ weights)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    return probabilities


class CountingPredictor:
    """A Predictor that records every call: (model_name, batch shape)."""

    def __init__(self, models: dict[str, Callable[[np.ndarray], np.ndarray]]) -> None:
        self.models = models
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, model_name: str, batch: np.ndarray) -> np.ndarray:
        self.calls.append((model_name, batch.shape))
        if model_name not in self.models:
            raise KeyError(f"no model '{model_name}'")
        return self.models[model_name](batch)


@pytest.fixture(scope="session")
def classify(mnist: MnistSplit) -> Callable[[np.ndarray], np.ndarray]:
    """The protected model: (n, 28, 28, 1) → probabilities (n, 10) float32."""
    return fit_classifier(mnist.x_train, mnist.y_train)


@pytest.fixture(scope="session")
def reconstruct(mnist: MnistSplit) -> Callable[[np.ndarray], np.ndarray]:
    """A linear 'autoencoder': projection onto the top 32 principal components, same shape out."""
    flat = mnist.x_train.reshape(len(mnist.x_train), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[:32]

    def reconstruction(batch: np.ndarray) -> np.ndarray:
        centred = batch.reshape(len(batch), -1) - mean
        return ((centred @ basis.T) @ basis + mean).reshape(batch.shape).astype(np.float32)

    return reconstruction


@pytest.fixture
def predictor(classify, reconstruct) -> CountingPredictor:
    """The protected model ("") and the autoencoder, counting calls."""
    return CountingPredictor({"": classify, AUTOENCODER_NAME: reconstruct})


@pytest.fixture(scope="session")
def shared_predictor(classify, reconstruct) -> Predictor:
    return CountingPredictor({"": classify, AUTOENCODER_NAME: reconstruct})
