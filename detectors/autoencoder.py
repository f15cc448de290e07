"""Autoencoder reconstruction error (MagNet: Meng & Chen, "MagNet: a Two-Pronged
Defense against Adversarial Examples", CCS 2017, detector I).

Idea: an autoencoder trained on benign data only learns the manifold of benign
inputs; it reconstructs them well and inputs far from the manifold (noise,
adversarial perturbations) badly. The score of a sample is its mean
reconstruction error

    score = mean_j | x_j − AE(x)_j |^p

over the sample's features, with p = 1 or 2 (MagNet's MNIST defence uses one
detector of each); higher = more anomalous. NaN/Inf scores become +inf.

What it assumes: the autoencoder was trained on benign data of the protected
model's input distribution (``tfshield calibrate`` trains it:
``gateway.model.autoencoder.train_autoencoder``) and is served by the model
server beside the protected model (``export_autoencoder``), so that the
gateway calls it over gRPC and never loads TensorFlow. Its output has as many
values per sample as the input.

Needs a predictor: ``predictor(model_name, batch)`` returns the model's
``output`` (the reconstruction) for ``batch``; one call per scored batch.
"""

from __future__ import annotations

import math

import numpy as np

from detectors.base import Detector, DetectorError, Predictor, register

__all__ = ["AutoencoderDetector"]


@register
class AutoencoderDetector(Detector):
    """MagNet detector I: mean |x − AE(x)|^p per sample.

    Hyperparameters:

    ``model_name`` (str, default ``"mnist_autoencoder"``)
        the autoencoder's name on the model server (never ``""``, which is the
        protected model).
    ``output`` (str, default ``"reconstruction"``)
        the autoencoder's output holding the reconstruction.
    ``p`` (1 or 2, default 1)
        the error's exponent: 1 = mean absolute error, 2 = mean squared error.

    Learned (by ``fit``): ``n_features_`` (int), features per sample.
    """

    name = "autoencoder"
    params = ("model_name", "output", "p")
    needs_predictor = True

    n_features_: int

    def __init__(
        self, model_name: str = "mnist_autoencoder", output: str = "reconstruction", p: int = 1
    ) -> None:
        if not model_name:
            raise DetectorError(
                "autoencoder: model_name must name the autoencoder model ('' is the protected model)"
            )
        if p not in (1, 2):
            raise DetectorError(f"autoencoder: p must be 1 or 2, got {p}")
        self.model_name = model_name
        self.output = output
        self.p = int(p)

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        # Nothing to learn (the autoencoder is trained elsewhere); check on a
        # few samples that the predictor reconstructs inputs of this shape.
        self.n_features_ = math.prod(x_ref.shape[1:])
        self._errors(x_ref[:8], predictor)

    def _scalars(self) -> dict[str, float | int | str]:
        return {"n_features_": self.n_features_}

    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0)
        scores = self._errors(x, predictor)
        scores[np.isnan(scores)] = np.inf
        return scores

    def _errors(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        if predictor is None:  # the base class checks this already; keeps the type narrow
            raise DetectorError("autoencoder: calls the autoencoder model; pass a predictor")
        n = len(x)
        features = math.prod(x.shape[1:])
        if features != self.n_features_:
            raise DetectorError(
                f"autoencoder: samples have {features} features; "
                f"the detector was fitted on {self.n_features_}"
            )
        reconstruction = np.asarray(predictor(self.model_name, x))
        if reconstruction.size != x.size:
            raise DetectorError(
                f"autoencoder: model '{self.model_name}' returned shape {list(reconstruction.shape)} for "
                f"inputs of shape {list(x.shape)}; it must reconstruct its input"
            )
        diff = np.abs(x.reshape(n, features).astype(np.float64) - reconstruction.reshape(n, features))
        if self.p == 2:
            diff *= diff
        return diff.mean(axis=1)
