"""The detector contract, after scikit-learn's estimators and alibi-detect's detectors.

A detector is an estimator of "how anomalous is this input":

- hyperparameters are keyword arguments stored unchanged on the instance;
- ``fit(x_ref)`` learns from benign reference data; learned state ends in ``_``
  and is set only by ``fit`` and ``calibrate``;
- ``score(x) -> ndarray (n,)``: one value per sample, higher = more anomalous;
- ``calibrate(x_val, fpr)`` sets ``threshold_`` so that at most a fraction
  ``fpr`` of held-out benign samples score above it (never set by hand);
- ``detect(x) -> Detection``: scores and flags (``score > threshold_``);
- ``save(dir)`` / ``load(dir)``: plain files, ``arrays.npz`` (loaded with
  ``allow_pickle=False``) and ``detector.json`` (name, format version,
  hyperparameters, scalar state). Never pickle.

Detectors that need the protected model in the loop (feature squeezing) or an
auxiliary model (an autoencoder) get it through a ``Predictor``: a callable
taking ``(model_name, batch)`` and returning the model's output array (the
protected model is named ``""``). The gateway's implementation batches those
calls upstream; offline tools pass a function that calls a model directly.

Scoring before fitting or calibrating raises :class:`NotCalibrated`, never warns.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from gateway.errors import TfshieldError

FORMAT_VERSION = 1
Predictor = Callable[[str, np.ndarray], np.ndarray]


class DetectorError(TfshieldError):
    """Root of detector errors."""


class NotCalibrated(DetectorError):
    """A detector was used before ``fit``/``calibrate``; the message says which to call."""


class ArtefactError(DetectorError):
    """A saved detector cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class Detection:
    """Scores and verdicts of one detector over one batch."""

    detector: str
    scores: np.ndarray  # (n,) float64, higher = more anomalous
    flagged: np.ndarray  # (n,) bool, scores > threshold
    threshold: float


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector known to config by its ``name``."""
    if cls.name in REGISTRY:
        raise DetectorError(f"detector name '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def detector_class(name: str) -> type[Detector]:
    """The registered detector called ``name``; the error lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DetectorError(f"unknown detector '{name}'; known: {', '.join(sorted(REGISTRY))}") from None


class Detector(ABC):
    """Base class. Subclasses set ``name``, take hyperparameters as keyword
    arguments (stored under the same attribute names, listed in ``params``),
    and implement ``_fit`` and ``_score``."""

    name: ClassVar[str] = ""
    # Hyperparameter names, in the order of the constructor's keyword arguments.
    params: ClassVar[tuple[str, ...]] = ()
    # True when scoring calls a model through a Predictor.
    needs_predictor: ClassVar[bool] = False

    threshold_: float
    target_fpr_: float

    # -- to implement --------------------------------------------------------

    @abstractmethod
    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        """Learn from benign reference data; set attributes ending in ``_``."""

    @abstractmethod
    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        """One score per sample of ``x``, higher = more anomalous."""

    def _state(self) -> dict[str, np.ndarray]:
        """Learned arrays to save (names end in ``_``); scalars go through ``_scalars``."""
        return {}

    def _scalars(self) -> dict[str, float | int | str]:
        return {}

    # -- the contract ----------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.params}

    @property
    def fitted(self) -> bool:
        return getattr(self, "fitted_", False)

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "threshold_")

    def fit(self, x_ref: np.ndarray, predictor: Predictor | None = None) -> Self:
        x_ref = np.asarray(x_ref)
        if len(x_ref) < 2:
            raise DetectorError(f"{self.name}: fit needs at least 2 reference samples, got {len(x_ref)}")
        self._check_predictor(predictor)
        self._fit(x_ref, predictor)
        self.fitted_ = True
        return self

    def score(self, x: np.ndarray, predictor: Predictor | None = None) -> np.ndarray:
        if not self.fitted:
            raise NotCalibrated(f"detector '{self.name}' is not fitted; call fit(x_ref) first")
        self._check_predictor(predictor)
        scores = np.asarray(self._score(np.asarray(x), predictor), dtype=np.float64)
        if scores.shape != (len(x),):
            raise DetectorError(f"{self.name}: score returned shape {scores.shape}, expected ({len(x)},)")
        return scores

    def calibrate(self, x_val: np.ndarray, fpr: float, predictor: Predictor | None = None) -> Self:
        """Set ``threshold_`` at the target false-positive rate on benign ``x_val``."""
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"{self.name}: fpr must be in (0, 1), got {fpr}")
        return self.calibrate_scores(self.score(x_val, predictor), fpr)

    def calibrate_scores(self, scores: np.ndarray, fpr: float) -> Self:
        """:meth:`calibrate` from this detector's scores of the benign samples, already computed."""
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"{self.name}: fpr must be in (0, 1), got {fpr}")
        self.threshold_ = threshold_at_fpr(scores, fpr)
        self.target_fpr_ = float(fpr)
        return self

    def detect(self, x: np.ndarray, predictor: Predictor | None = None) -> Detection:
        if not self.calibrated:
            raise NotCalibrated(f"detector '{self.name}' has no threshold; call calibrate(x_val, fpr) first")
        scores = self.score(x, predictor)
        return Detection(self.name, scores, scores > self.threshold_, self.threshold_)

    def _check_predictor(self, predictor: Predictor | None) -> None:
        if self.needs_predictor and predictor is None:
            raise DetectorError(
                f"detector '{self.name}' calls a model: pass predictor=(model_name, batch) -> output"
            )

    # -- artefacts ---------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``detector.json`` and ``arrays.npz`` into ``directory``."""
        if not self.calibrated:
            raise NotCalibrated(f"detector '{self.name}' has no threshold; calibrate it before saving")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = self._state()
        bad = [k for k in arrays if not k.endswith("_")]
        if bad:
            raise DetectorError(f"{self.name}: learned arrays must end in '_': {bad}")
        np.savez(folder / "arrays.npz", **arrays)
        meta = {
            "detector": self.name,
            "format_version": FORMAT_VERSION,
            "params": self.get_params(),
            "threshold_": self.threshold_,
            "target_fpr_": self.target_fpr_,
            "scalars": self._scalars(),
        }
        write_artefact_json(folder / "detector.json", meta)
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> Detector:
        """Load any registered detector saved with ``save`` (this class or a subclass)."""
        folder = Path(directory)
        meta_path = folder / "detector.json"
        meta = read_artefact_json(meta_path, "detector metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtefactError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, this tfshield reads "
                f"{FORMAT_VERSION}; re-run tfshield calibrate"
            )
        target = detector_class(meta.get("detector", ""))
        if not issubclass(target, cls):
            raise ArtefactError(f"{meta_path}: holds a '{target.name}' detector, not a '{cls.name}'")
        detector = target(**meta["params"])
        try:
            with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
                for key in arrays.files:
                    setattr(detector, key, arrays[key])
        except (OSError, ValueError) as exc:
            raise ArtefactError(f"{folder / 'arrays.npz'}: cannot load arrays: {exc}") from None
        for key, value in meta.get("scalars", {}).items():
            setattr(detector, key, value)
        detector.threshold_ = float(meta["threshold_"])
        detector.target_fpr_ = float(meta["target_fpr_"])
        detector.fitted_ = True
        return detector


def write_artefact_json(path: Path, meta: dict[str, Any]) -> None:
    """Write an artefact's metadata as the plain, sorted JSON :func:`read_artefact_json` reads."""
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_artefact_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object at ``path``, an artefact's metadata; ArtefactError naming ``what`` when it cannot
    be read or is not an object. Plain JSON: nothing is unpickled or evaluated."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{path}: cannot read {what}: {exc}") from None
    if not isinstance(data, dict):
        raise ArtefactError(f"{path}: cannot read {what}: not a JSON object")
    return data


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold such that at most ``fpr`` of ``benign_scores`` exceed it.

    With n scores, at most floor(fpr * n) may lie strictly above the threshold,
    so the threshold is the (n - floor(fpr * n))-th smallest score.
    """
    scores = np.sort(np.asarray(benign_scores, dtype=np.float64))
    if scores.size == 0:
        raise DetectorError("cannot calibrate on zero samples")
    if not np.all(np.isfinite(scores)):
        raise DetectorError("benign calibration scores contain NaN or Inf; check the reference data")
    allowed_above = int(np.floor(fpr * scores.size))
    return float(scores[scores.size - allowed_above - 1])
