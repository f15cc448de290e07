"""AutoencoderDetector (MagNet detector I), and the real autoencoder trained and exported for TF Serving."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.autoencoder import AutoencoderDetector
from detectors.base import DetectorError
from tests.detectors.conftest import AUTOENCODER_NAME, CountingPredictor


def shifted_by(offset: float) -> CountingPredictor:
    """An 'autoencoder' reconstructing every input as itself plus ``offset``."""
    return CountingPredictor({AUTOENCODER_NAME: lambda batch: batch + np.float32(offset)})


@pytest.mark.parametrize(("p", "expected"), [(1, 0.25), (2, 0.0625)])
def test_score_is_the_mean_reconstruction_error_to_the_power_p(p, expected):
    x = np.zeros((3, 4, 4, 1), dtype=np.float32)
    detector = AutoencoderDetector(p=p).fit(x, shifted_by(0.25))
    np.testing.assert_allclose(detector.score(x, shifted_by(0.25)), [expected] * 3)


def test_score_weighs_each_sample_by_its_own_error():
    x = np.zeros((2, 2), dtype=np.float32)

    def reconstruct(batch: np.ndarray) -> np.ndarray:
        out = batch.copy()
        out[1] = [1.0, 0.0]
        return out

    predictor = CountingPredictor({AUTOENCODER_NAME: reconstruct})
    detector = AutoencoderDetector().fit(x, predictor)
    np.testing.assert_allclose(detector.score(x, predictor), [0.0, 0.5])


def test_score_calls_the_autoencoder_by_name_once_per_batch(mnist, reconstruct):
    predictor = CountingPredictor({AUTOENCODER_NAME: reconstruct})
    detector = AutoencoderDetector().fit(mnist.x_train[:20], predictor)
    predictor.calls.clear()
    detector.score(mnist.x_test[:5], predictor)
    assert predictor.calls == [(AUTOENCODER_NAME, (5, 28, 28, 1))]


def test_a_reconstruction_of_another_size_is_refused(mnist):
    predictor = CountingPredictor({AUTOENCODER_NAME: lambda batch: batch[:, :14]})
    with pytest.raises(DetectorError) as caught:
        AutoencoderDetector().fit(mnist.x_train[:4], predictor)
    assert str(caught.value) == (
        "autoencoder: model 'mnist_autoencoder' returned shape [4, 14, 28, 1] for inputs of shape "
        "[4, 28, 28, 1]; it must reconstruct its input"
    )


def test_a_nan_reconstruction_scores_infinite(mnist):
    predictor = CountingPredictor({AUTOENCODER_NAME: lambda batch: np.full_like(batch, np.nan)})
    detector = AutoencoderDetector().fit(mnist.x_train[:4], shifted_by(0.0))
    np.testing.assert_array_equal(detector.score(mnist.x_test[:2], predictor), [np.inf, np.inf])


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(DetectorError, match=r"model_name must name the autoencoder model \(''"):
        AutoencoderDetector(model_name="")
    with pytest.raises(DetectorError, match="p must be 1 or 2, got 3"):
        AutoencoderDetector(p=3)


@pytest.mark.slow
def test_the_trained_autoencoder_exports_for_tf_serving_and_flags_noise(mnist, tmp_path):
    """Four epochs (past the sigmoid plateau): enough to tell digits from noise, and cheap."""
    tf = pytest.importorskip("tensorflow")
    from gateway.model.autoencoder import export_autoencoder, train_autoencoder

    model = train_autoencoder(mnist.x_train, mnist.x_validation[:100], epochs=4, seed=0)
    assert 0.0 < model.validation_mse_ < 0.03
    export_dir = export_autoencoder(model, tmp_path)
    assert export_dir == tmp_path / "mnist_autoencoder" / "1"
    assert (export_dir / "saved_model.pb").is_file()

    loaded = tf.saved_model.load(str(export_dir))  # keep it alive: the signature uses its variables
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert (spec.name, spec.dtype, spec.shape.as_list()) == ("images", tf.float32, [None, 28, 28, 1])
    assert list(serve.structured_outputs) == ["reconstruction"]

    def predictor(name: str, batch: np.ndarray) -> np.ndarray:
        assert name == "mnist_autoencoder"
        return serve(images=tf.constant(batch))["reconstruction"].numpy()

    detector = AutoencoderDetector().fit(mnist.x_train[:100], predictor)
    detector.calibrate(mnist.x_validation[:200], 0.05, predictor)
    noise = np.clip(mnist.x_test[:100] + np.random.default_rng(0).normal(0, 0.3, (100, 28, 28, 1)), 0, 1)
    assert detector.detect(noise.astype(np.float32), predictor).flagged.mean() > 0.9
    assert detector.detect(mnist.x_test[:200], predictor).flagged.mean() < 0.15
