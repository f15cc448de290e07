"""The detector contract, checked against every registered detector.

Like scikit-learn's ``parametrize_with_checks``: one suite, parametrized over
the stateless detectors of ``detectors.base.REGISTRY`` (monitors, stateful and
keyed by client, have a contract of their own). A new detector must add a constructor to
``CASES`` (its default hyperparameters unless they cannot work on MNIST) and
then passes these checks or fails loudly.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from detectors.base import (
    FORMAT_VERSION,
    REGISTRY,
    ArtefactError,
    Detector,
    DetectorError,
    NotCalibrated,
    detector_class,
)
from detectors.monitor import Monitor
from detectors.validation import InputValidator
from gateway.model.data import MnistSplit

TARGET_FPR = 0.05
# Stateless detectors; monitors (stateful, keyed by client) have their own contract.
NAMES = sorted(name for name, cls in REGISTRY.items() if not issubclass(cls, Monitor))

# How to build each registered detector for MNIST; defaults unless noted.
CASES: dict[str, Callable[[], Detector]] = {
    "validation": InputValidator,
    "mahalanobis": lambda: REGISTRY["mahalanobis"](),
    "feature_squeezing": lambda: REGISTRY["feature_squeezing"](),
    "autoencoder": lambda: REGISTRY["autoencoder"](),
    "margin": lambda: REGISTRY["margin"](),
    "magnet_jsd": lambda: REGISTRY["magnet_jsd"](),
}


def make(name: str) -> Detector:
    return CASES[name]()


def clearly_anomalous(like: np.ndarray, seed: int = 7) -> np.ndarray:
    """Gaussian noise N(0.5, 0.5²), unclipped: nothing like a digit, partly outside [0, 1]."""
    return np.random.default_rng(seed).normal(0.5, 0.5, like.shape).astype(like.dtype)


@pytest.fixture(scope="module")
def calibrated(mnist: MnistSplit, shared_predictor) -> dict[str, Detector]:
    """Every detector fitted on the training split and calibrated on validation at TARGET_FPR."""
    return {
        name: make(name)
        .fit(mnist.x_train, shared_predictor)
        .calibrate(mnist.x_validation, TARGET_FPR, shared_predictor)
        for name in NAMES
    }


def test_every_registered_detector_has_a_contract_case():
    assert sorted(CASES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_the_constructor_keywords_stored_as_given(name):
    cls = REGISTRY[name]
    keywords = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert list(cls.params) == keywords
    detector = make(name)
    assert cls(**detector.get_params()).get_params() == detector.get_params()
    json.dumps(detector.get_params())  # params travel in detector.json


@pytest.mark.parametrize("name", NAMES)
def test_score_before_fit_raises_not_calibrated(name, mnist, predictor):
    with pytest.raises(NotCalibrated) as raised:
        make(name).score(mnist.x_test[:4], predictor)
    assert str(raised.value) == f"detector '{name}' is not fitted; call fit(x_ref) first"


@pytest.mark.parametrize("name", NAMES)
def test_detect_before_calibrate_raises_not_calibrated(name, mnist, predictor):
    detector = make(name).fit(mnist.x_train[:200], predictor)
    with pytest.raises(NotCalibrated) as raised:
        detector.detect(mnist.x_test[:4], predictor)
    assert str(raised.value) == f"detector '{name}' has no threshold; call calibrate(x_val, fpr) first"


@pytest.mark.parametrize("name", NAMES)
def test_save_before_calibrate_raises_not_calibrated(name, mnist, predictor, tmp_path):
    detector = make(name).fit(mnist.x_train[:200], predictor)
    with pytest.raises(NotCalibrated, match="calibrate it before saving"):
        detector.save(tmp_path)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].needs_predictor])
def test_scoring_without_a_predictor_says_what_to_pass(name, calibrated, mnist):
    with pytest.raises(DetectorError) as raised:
        calibrated[name].score(mnist.x_test[:4])
    assert str(raised.value) == (
        f"detector '{name}' calls a model: pass predictor=(model_name, batch) -> output"
    )


@pytest.mark.parametrize("name", NAMES)
def test_score_is_one_finite_float64_per_benign_sample(name, calibrated, mnist, predictor):
    scores = calibrated[name].score(mnist.x_test[:37], predictor)
    assert scores.shape == (37,)
    assert scores.dtype == np.float64
    assert np.all(np.isfinite(scores))


# The margin detector reads the model's confidence, and a model is often confident on noise: it is
# for inputs at the decision boundary instead (tests/detectors/test_margin.py).
@pytest.mark.parametrize("name", [n for n in NAMES if n != "margin"])
def test_noise_scores_higher_than_benign(name, calibrated, mnist, predictor):
    detector = calibrated[name]
    benign = detector.score(mnist.x_test[:200], predictor)
    noise = detector.score(clearly_anomalous(mnist.x_test[:200]), predictor)
    assert np.median(noise) > np.quantile(benign, 0.95)


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_hits_the_target_fpr_on_fresh_benign_data(name, calibrated, mnist, predictor):
    """At most TARGET_FPR of benign data above the threshold, within 3 sigma.

    The threshold is estimated from n_cal validation scores and the rate
    measured on n_test fresh test scores, so both binomial errors count.
    When benign scores tie at the threshold (e.g. all 0 for a validator on
    clean data) the rate can only be lower, and just the upper bound holds.
    """
    detector = calibrated[name]
    n_cal, n_test = len(mnist.x_validation), len(mnist.x_test)
    sigma = math.sqrt(TARGET_FPR * (1 - TARGET_FPR) * (1 / n_cal + 1 / n_test))
    observed = detector.detect(mnist.x_test, predictor).flagged.mean()
    assert detector.target_fpr_ == TARGET_FPR
    assert observed <= TARGET_FPR + 3 * sigma
    calibration_scores = detector.score(mnist.x_validation, predictor)
    if np.count_nonzero(calibration_scores == detector.threshold_) == 1:
        assert observed >= TARGET_FPR - 3 * sigma


@pytest.mark.parametrize("name", NAMES)
def test_a_sample_scores_the_same_whatever_its_batch(name, calibrated, mnist, predictor):
    """Micro-batching must not change a request's score."""
    detector = calibrated[name]
    batch = mnist.x_test[:16]
    together = detector.score(batch, predictor)
    alone = np.concatenate([detector.score(batch[i : i + 1], predictor) for i in range(len(batch))])
    np.testing.assert_allclose(together, alone, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_scores_read_only_input_without_writing_it(name, calibrated, mnist, predictor):
    """The gateway decodes tensor_content into read-only arrays."""
    x = mnist.x_test[:8].copy()
    expected = calibrated[name].score(x, predictor)
    x.setflags(write=False)
    np.testing.assert_array_equal(calibrated[name].score(x, predictor), expected)
    np.testing.assert_array_equal(x, mnist.x_test[:8])


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_scores_empty(name, calibrated, mnist, predictor):
    assert calibrated[name].score(mnist.x_test[:0], predictor).shape == (0,)


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_scores_bit_identically(name, calibrated, mnist, predictor, tmp_path):
    detector = calibrated[name]
    detector.save(tmp_path)
    loaded = Detector.load(tmp_path)
    assert type(loaded) is type(detector)
    assert loaded.get_params() == detector.get_params()
    assert loaded.threshold_ == detector.threshold_
    assert loaded.target_fpr_ == detector.target_fpr_
    x = np.concatenate([mnist.x_test[:50], clearly_anomalous(mnist.x_test[:10])])
    np.testing.assert_array_equal(loaded.score(x, predictor), detector.score(x, predictor))
    np.testing.assert_array_equal(loaded.detect(x, predictor).flagged, detector.detect(x, predictor).flagged)


@pytest.mark.parametrize("name", NAMES)
def test_load_through_its_own_class_works_and_through_another_refuses(name, calibrated, tmp_path):
    calibrated[name].save(tmp_path)
    assert type(REGISTRY[name].load(tmp_path)) is REGISTRY[name]
    other = next(cls for n, cls in REGISTRY.items() if n != name)
    with pytest.raises(ArtefactError, match=f"holds a '{name}' detector, not a '{other.name}'"):
        other.load(tmp_path)


_UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    _UNPICKLED.append("unpickled")
    return "unpickled"


class _Canary:
    """Unpickling this runs _record_unpickling: proof that load never unpickles."""

    def __reduce__(self):
        return (_record_unpickling, ())


@pytest.mark.parametrize("name", NAMES)
def test_load_never_unpickles(name, calibrated, tmp_path):
    calibrated[name].save(tmp_path)
    with np.load(tmp_path / "arrays.npz") as saved:
        arrays = dict(saved)
    arrays["canary_"] = np.array([_Canary()], dtype=object)
    np.savez(tmp_path / "arrays.npz", **arrays)  # numpy pickles the object array
    with pytest.raises(ArtefactError, match=r"arrays\.npz: cannot load arrays: Object arrays cannot"):
        Detector.load(tmp_path)
    assert _UNPICKLED == []


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_another_format_version(name, calibrated, tmp_path):
    calibrated[name].save(tmp_path)
    meta_path = tmp_path / "detector.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtefactError) as raised:
        Detector.load(tmp_path)
    assert str(raised.value) == (
        f"{meta_path}: format_version {FORMAT_VERSION + 1}, this tfshield reads {FORMAT_VERSION}; "
        "re-run tfshield calibrate"
    )


def test_an_unknown_detector_name_lists_the_known_ones():
    with pytest.raises(DetectorError) as raised:
        detector_class("isolation_forest")
    assert str(raised.value) == f"unknown detector 'isolation_forest'; known: {', '.join(sorted(REGISTRY))}"
    for name in ("autoencoder", "feature_squeezing", "mahalanobis", "validation"):
        assert name in str(raised.value)


def test_loading_an_artefact_of_an_unknown_detector_lists_the_known_ones(tmp_path: Path):
    (tmp_path / "detector.json").write_text(
        json.dumps({"detector": "isolation_forest", "format_version": FORMAT_VERSION, "params": {}})
    )
    with pytest.raises(DetectorError, match=r"unknown detector 'isolation_forest'; known: .*mahalanobis"):
        Detector.load(tmp_path)
