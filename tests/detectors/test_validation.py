"""InputValidator: signature-derived dtype and shape, NaN/Inf, learned value range, exact messages."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import DetectorError
from detectors.validation import InputValidator, validators_from_signature
from gateway.errors import InvalidInput
from protos import meta_graph_pb2, types_pb2


def tensor_info(dtype: int, dims: list[int] | None) -> meta_graph_pb2.TensorInfo:
    info = meta_graph_pb2.TensorInfo(dtype=dtype)
    if dims is None:
        info.tensor_shape.unknown_rank = True
    else:
        for size in dims:
            info.tensor_shape.dim.add(size=size)
    return info


def mnist_signature() -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    signature.inputs["images"].CopyFrom(tensor_info(types_pb2.DT_FLOAT, [-1, 28, 28, 1]))
    signature.inputs["keep"].CopyFrom(tensor_info(types_pb2.DT_BOOL, [-1]))
    signature.outputs["probabilities"].CopyFrom(tensor_info(types_pb2.DT_FLOAT, [-1, 10]))
    return signature


@pytest.fixture(scope="module")
def images_validator(mnist) -> InputValidator:
    validator = validators_from_signature(mnist_signature(), inputs=["images"])["images"]
    return validator.fit(mnist.x_train).calibrate(mnist.x_validation, 0.01)


def raised(validator: InputValidator, array: np.ndarray, name: str = "images") -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        validator.check(name, array)
    return caught.value


# -- built from the signature ---------------------------------------------------------


def test_signature_gives_dtype_and_per_sample_shape_without_the_batch_axis():
    validators = validators_from_signature(mnist_signature())
    assert sorted(validators) == ["images", "keep"]
    assert validators["images"].get_params() == {
        "dtype": "float32",
        "shape": (28, 28, 1),
        "range_margin": 0.0,
        "per_feature": False,
    }
    assert validators["keep"].dtype == "bool"
    assert validators["keep"].shape == ()


def test_bfloat16_input_expects_the_float32_the_codec_decodes_it_to():
    validator = InputValidator.from_tensor_info("x", tensor_info(types_pb2.DT_BFLOAT16, [-1, 4]))
    assert validator.dtype == "float32"


def test_unknown_rank_leaves_the_shape_open():
    validator = InputValidator.from_tensor_info("x", tensor_info(types_pb2.DT_INT64, None))
    assert (validator.dtype, validator.shape) == ("int64", None)
    validator.check("x", np.zeros((2, 3, 5), dtype=np.int64))


def test_a_scalar_signature_input_is_refused_with_the_way_out():
    signature = mnist_signature()
    signature.inputs["temperature"].CopyFrom(tensor_info(types_pb2.DT_FLOAT, []))
    with pytest.raises(DetectorError) as caught:
        validators_from_signature(signature)
    assert str(caught.value) == (
        "validation: input 'temperature' is a scalar (rank 0) in the signature, so it has no batch axis "
        "to validate per sample; leave it out with inputs=[...]"
    )
    assert sorted(validators_from_signature(signature, inputs=["images", "keep"])) == ["images", "keep"]


def test_selecting_an_input_the_signature_lacks_names_the_inputs_it_has():
    with pytest.raises(DetectorError) as caught:
        validators_from_signature(mnist_signature(), inputs=["pixels"])
    assert str(caught.value) == "validation: the signature has no input ['pixels']; its inputs: images, keep"


def test_hyperparameters_pass_through_to_every_validator():
    validators = validators_from_signature(mnist_signature(), range_margin=0.1)
    assert {v.range_margin for v in validators.values()} == {0.1}


# -- check(): the request path, exact messages and reasons ------------------------------


def test_check_accepts_benign_digits(images_validator, mnist):
    images_validator.check("images", mnist.x_test)


def test_wrong_dtype_names_the_input_and_both_dtypes(images_validator, mnist):
    error = raised(images_validator, mnist.x_test[:2].astype(np.float64))
    assert str(error) == "input 'images': dtype is float64, expected float32"
    assert (error.input_name, error.reason) == ("images", "dtype")


def test_wrong_per_sample_shape_names_both_shapes(images_validator):
    error = raised(images_validator, np.zeros((3, 28, 28), dtype=np.float32))
    assert str(error) == (
        "input 'images': per-sample shape is [28, 28] (batch shape [3, 28, 28]), expected [28, 28, 1]"
    )
    assert error.reason == "shape"


def test_shape_message_explains_minus_one_when_a_dimension_is_free():
    validator = InputValidator(dtype="float32", shape=[-1, 3])
    validator.check("tokens", np.zeros((2, 7, 3), dtype=np.float32))
    error = raised(validator, np.zeros((2, 7, 4), dtype=np.float32), "tokens")
    assert str(error) == (
        "input 'tokens': per-sample shape is [7, 4] (batch shape [2, 7, 4]), expected [-1, 3] (-1 = any size)"
    )


def test_a_scalar_request_tensor_has_no_batch(images_validator):
    error = raised(images_validator, np.float32(0.5) * np.ones((), dtype=np.float32))
    assert str(error) == "input 'images': is a scalar; expected a batch of shape [-1, 28, 28, 1]"
    assert error.reason == "shape"


def test_nan_names_the_input_and_the_first_bad_sample(images_validator, mnist):
    batch = mnist.x_test[:4].copy()
    batch[2, 14, 14, 0] = np.nan
    batch[3, 0, 0, 0] = np.inf
    error = raised(images_validator, batch)
    assert str(error) == "input 'images': sample 2 holds NaN or Inf; send finite values"
    assert error.reason == "nonfinite"


def test_out_of_range_names_the_accepted_range(images_validator, mnist):
    batch = mnist.x_test[:3].copy()
    batch[1, 5, 5, 0] = 1.5
    error = raised(images_validator, batch)
    # The reference digits span exactly [0, 1] and benign validation data never leaves it.
    assert str(error) == "input 'images': sample 1 has values outside the accepted range [0, 1]"
    assert error.reason == "range"


def test_checks_come_in_order_dtype_shape_nonfinite_range(images_validator):
    everything_wrong = np.full((2, 28, 28), np.nan, dtype=np.float64)
    assert raised(images_validator, everything_wrong).reason == "dtype"
    assert raised(images_validator, everything_wrong.astype(np.float32)).reason == "shape"


def test_before_calibration_check_enforces_the_signature_but_not_the_range():
    validator = validators_from_signature(mnist_signature())["images"]
    assert not validator.checks_range
    validator.check("images", np.full((1, 28, 28, 1), 7.0, dtype=np.float32))
    assert raised(validator, np.zeros((1, 28, 28, 1), dtype=np.float64)).reason == "dtype"
    assert raised(validator, np.full((1, 28, 28, 1), np.nan, dtype=np.float32)).reason == "nonfinite"


# -- score(): distance outside the range, in spans -------------------------------------------


def test_score_is_zero_inside_and_the_distance_in_spans_outside(images_validator):
    batch = np.zeros((4, 28, 28, 1), dtype=np.float32)
    batch[1, 0, 0, 0] = 1.5
    batch[2, 0, 0, 0] = -0.25
    batch[3, 0, 0, 0] = np.nan
    np.testing.assert_array_equal(images_validator.score(batch), [0.0, 0.5, 0.25, np.inf])


def test_infinities_score_infinite(images_validator):
    batch = np.zeros((2, 28, 28, 1), dtype=np.float32)
    batch[0, 3, 3, 0] = np.inf
    batch[1, 3, 3, 0] = -np.inf
    np.testing.assert_array_equal(images_validator.score(batch), [np.inf, np.inf])


def test_a_batch_of_the_wrong_dtype_or_shape_scores_infinite(images_validator):
    np.testing.assert_array_equal(images_validator.score(np.zeros((2, 28, 28, 1))), [np.inf, np.inf])
    np.testing.assert_array_equal(images_validator.score(np.zeros((2, 784), np.float32)), [np.inf, np.inf])


def test_range_margin_widens_the_range_by_a_fraction_of_the_span(mnist):
    validator = InputValidator(range_margin=0.1).fit(mnist.x_train)
    batch = np.zeros((3, 28, 28, 1), dtype=np.float32)
    batch[1, 0, 0, 0] = 1.05
    batch[2, 0, 0, 0] = 1.3
    np.testing.assert_allclose(validator.score(batch), [0.0, 0.0, 0.2], rtol=1e-6)


def test_per_feature_range_catches_a_lit_border_pixel_the_whole_input_range_allows(mnist):
    whole = InputValidator().fit(mnist.x_train)
    per_feature = InputValidator(per_feature=True).fit(mnist.x_train)
    digit = mnist.x_test[:1].copy()
    digit[0, 0, 0, 0] = 1.0  # a corner pixel: dark in every reference digit
    assert whole.score(digit)[0] == 0.0
    assert per_feature.score(digit)[0] == 1.0
    assert per_feature.low_.shape == (784,)
    assert whole.low_.shape == (1,)


def test_per_feature_needs_a_fixed_shape():
    with pytest.raises(DetectorError) as caught:
        InputValidator(shape=[-1], per_feature=True).fit(np.zeros((4, 3), dtype=np.float32))
    assert str(caught.value) == "validation: per_feature=True needs a fixed per-sample shape, got [-1]"


def test_fit_refuses_reference_data_of_another_dtype(mnist):
    with pytest.raises(DetectorError) as caught:
        InputValidator(dtype="float32").fit(mnist.x_train.astype(np.float64))
    assert str(caught.value) == (
        "validation: reference data has dtype float64, but dtype='float32'; "
        "cast the reference data to float32"
    )


def test_fit_refuses_reference_data_of_another_shape(mnist):
    with pytest.raises(DetectorError, match=r"reference samples have shape \[28, 28, 1\], but shape=\[784\]"):
        InputValidator(shape=[784]).fit(mnist.x_train)


def test_integer_inputs_get_a_range_too():
    reference = np.random.default_rng(0).integers(10, 200, (50, 8)).astype(np.uint8)
    validator = InputValidator().fit(reference).calibrate(reference, 0.01)
    assert validator.dtype_ == "uint8"
    batch = reference[:2].copy()
    batch[1, 0] = 255
    error = raised(validator, batch, "pixels")
    assert error.reason == "range"
    assert validator.score(batch)[0] == 0.0


def test_string_inputs_are_checked_for_dtype_and_shape_only():
    reference = np.array([[b"a"], [b"bc"]], dtype=object)
    validator = InputValidator().fit(reference).calibrate(reference, 0.5)
    np.testing.assert_array_equal(validator.score(reference), [0.0, 0.0])
    validator.check("text", np.array([[b"anything"]], dtype=object))
    assert raised(validator, np.array([b"x"], dtype=object), "text").reason == "shape"


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(DetectorError, match="dtype 'floaty' is not a numpy dtype name"):
        InputValidator(dtype="floaty")
    with pytest.raises(DetectorError, match="range_margin must be >= 0"):
        InputValidator(range_margin=-0.1)
    with pytest.raises(DetectorError, match="below -1"):
        InputValidator(shape=[-2])
