"""Detectors: estimators scoring how anomalous an input is (see ``detectors.base``).

Importing this package registers every detector by name (``detectors.base.REGISTRY``).
"""

from detectors import (  # noqa: F401  (registers them)
    autoencoder,
    divergence,
    mahalanobis,
    margin,
    squeeze,
    validation,
)
from detectors.base import REGISTRY, Detection, Detector, detector_class

__all__ = ["REGISTRY", "Detection", "Detector", "detector_class"]

# Monitors: stateful, keyed by client (see ``detectors.monitor``).
from detectors import blacklight, knn, ood_rate, prada, volume  # noqa: E402, F401  (registers them)
