"""FeatureSqueezing: the squeezers (median equal to scipy's), one model call per batch, the score."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from detectors.base import DetectorError
from detectors.squeeze import FeatureSqueezing, median_filter, reduce_bit_depth
from tests.detectors.conftest import CountingPredictor


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("shape", [(5, 28, 28, 1), (3, 9, 7, 3), (4, 6, 5)])
def test_median_filter_equals_scipy_on_random_images(size, shape):
    rng = np.random.default_rng(size * 100 + len(shape))
    images = rng.random(shape, dtype=np.float32)
    spatial = (1, size, size) + (1,) * (len(shape) - 3)
    expected = ndimage.median_filter(images, size=spatial, mode="reflect")
    result = median_filter(images, size)
    assert result.dtype == images.dtype
    np.testing.assert_array_equal(result, expected)


def test_median_filter_equals_scipy_with_ties_and_on_digits(mnist):
    rng = np.random.default_rng(11)
    quantised = rng.integers(0, 3, (6, 10, 10, 1)).astype(np.float32)  # many ties
    for images in (quantised, mnist.x_test[:20]):
        expected = ndimage.median_filter(images, size=(1, 2, 2, 1), mode="reflect")
        np.testing.assert_array_equal(median_filter(images, 2), expected)


def test_a_2x2_median_takes_the_upper_middle_value_over_the_pixel_above_left():
    image = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2)
    # Output (1, 1) sees rows 0..1 and columns 0..1: {1, 2, 3, 4} → 3 (not 2.5).
    # Output (0, 0) sees the reflected first row and column: {1, 1, 1, 1} → 1.
    np.testing.assert_array_equal(median_filter(image, 2)[0], [[1.0, 2.0], [3.0, 3.0]])


def test_median_filter_needs_images():
    with pytest.raises(DetectorError, match=r"median filter needs images \(n, height, width\[, channels\]\)"):
        median_filter(np.zeros((4, 784), dtype=np.float32), 2)


def test_one_bit_depth_on_unit_range_is_a_threshold_at_one_half():
    x = np.array([0.0, 0.2, 0.5, 0.5001, 0.9, 1.0], dtype=np.float32)
    squeezed = reduce_bit_depth(x, 1)
    np.testing.assert_array_equal(squeezed, [0, 0, 0, 1, 1, 1])  # 0.5 rounds half to even
    assert squeezed.dtype == np.float32


def test_bit_depth_spreads_levels_over_the_value_range():
    x = np.array([0, 40, 100, 200, 255], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_bit_depth(x, 2, (0.0, 255.0)), [0, 0, 85, 170, 255])
    assert reduce_bit_depth(x, 2, (0.0, 255.0)).dtype == np.uint8


def test_variants_are_one_squeezed_batch_per_squeezer_of_the_input_shape_and_dtype(mnist):
    x = mnist.x_test[:3]
    detector = FeatureSqueezing(squeezers=["median", "bit_depth"])
    median, bits = detector.variants(x)
    np.testing.assert_array_equal(median, median_filter(x, 2))
    np.testing.assert_array_equal(bits, reduce_bit_depth(x, 1))
    assert {v.dtype for v in (median, bits)} == {np.dtype(np.float32)}


def test_score_calls_the_protected_model_once_on_original_then_variants(mnist, classify):
    predictor = CountingPredictor({"": classify})
    detector = FeatureSqueezing().fit(mnist.x_train[:50], predictor)
    predictor.calls.clear()
    batch_seen = []

    def spy(name: str, batch: np.ndarray) -> np.ndarray:
        batch_seen.append(batch)
        return predictor(name, batch)

    detector.score(mnist.x_test[:7], spy)
    assert predictor.calls == [("", (21, 28, 28, 1))]
    np.testing.assert_array_equal(batch_seen[0][:7], mnist.x_test[:7])
    np.testing.assert_array_equal(batch_seen[0][7:14], reduce_bit_depth(mnist.x_test[:7], 1))
    np.testing.assert_array_equal(batch_seen[0][14:], median_filter(mnist.x_test[:7], 2))


def test_the_gateway_split_path_gives_the_same_scores_as_score(mnist, classify):
    """Gateway: concatenate [x, *variants], one upstream call, split, score_outputs."""
    detector = FeatureSqueezing().fit(mnist.x_train[:50], CountingPredictor({"": classify}))
    x = mnist.x_test[:9]
    variants = detector.variants(x)
    response = classify(np.concatenate([x, *variants]))
    original, *squeezed = np.split(response, 1 + len(variants))
    np.testing.assert_array_equal(
        detector.score_outputs(original, squeezed), detector.score(x, CountingPredictor({"": classify}))
    )


def test_score_is_the_largest_l1_distance_over_squeezers():
    detector = FeatureSqueezing()
    original = np.array([[0.9, 0.1], [0.5, 0.5]])
    first = np.array([[0.7, 0.3], [0.5, 0.5]])
    second = np.array([[0.8, 0.2], [0.0, 1.0]])
    np.testing.assert_allclose(detector.score_outputs(original, [first, second]), [0.4, 1.0])


def test_softmax_turns_a_logits_output_into_probabilities_first():
    detector = FeatureSqueezing(softmax=True)
    logits = np.array([[0.0, 0.0]])
    np.testing.assert_allclose(detector.score_outputs(logits, [np.array([[np.log(3.0), 0.0]])]), [0.5])


def test_fit_refuses_a_logits_output_and_says_to_set_softmax(mnist):
    def logits(name: str, batch: np.ndarray) -> np.ndarray:
        return np.tile(np.arange(10.0), (len(batch), 1))

    with pytest.raises(DetectorError) as caught:
        FeatureSqueezing().fit(mnist.x_train[:20], logits)
    assert str(caught.value) == (
        "feature_squeezing: output 'probabilities' does not look like probabilities (rows sum to 45..45); "
        "set softmax=True if it holds logits"
    )
    assert FeatureSqueezing(softmax=True).fit(mnist.x_train[:20], logits).n_classes_ == 10


def test_a_predictor_returning_the_wrong_number_of_rows_is_refused(mnist, classify):
    detector = FeatureSqueezing().fit(mnist.x_train[:20], CountingPredictor({"": classify}))
    with pytest.raises(DetectorError) as caught:
        detector.score(mnist.x_test[:4], lambda name, batch: classify(batch[:4]))
    assert str(caught.value) == (
        "feature_squeezing: predictor returned 4 rows for a batch of 12; "
        "it must return one output row per input"
    )


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(DetectorError) as caught:
        FeatureSqueezing(squeezers=["bit_depth", "jpeg"])
    assert str(caught.value) == (
        "feature_squeezing: squeezers must be a non-empty list of bit_depth, median; "
        "got ['bit_depth', 'jpeg']"
    )
    with pytest.raises(DetectorError, match="non-empty"):
        FeatureSqueezing(squeezers=[])
    with pytest.raises(DetectorError, match="bit_depth must be an integer in 1..16, got 0"):
        FeatureSqueezing(bit_depth=0)
    with pytest.raises(DetectorError, match="median_size must be an integer >= 1, got 0"):
        FeatureSqueezing(median_size=0)
    with pytest.raises(DetectorError, match="value_range must be"):
        FeatureSqueezing(value_range=(1.0, 0.0))


def test_squeezed_benign_digits_mostly_keep_their_prediction(mnist, classify):
    """The premise: a benign digit's prediction barely moves under squeezing."""
    predictor = CountingPredictor({"": classify})
    scores = FeatureSqueezing().fit(mnist.x_train[:20], predictor).score(mnist.x_test, predictor)
    assert np.median(scores) < 0.1
