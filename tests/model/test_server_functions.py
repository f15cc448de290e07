"""The reference model server's functions called in-process: tensor encoding,
loading, and options that would otherwise need a server per setting."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import classification_pb2, predict_pb2

from gateway.errors import TfshieldError
from gateway.model.server import (
    ModelRegistry,
    ServingError,
    classify,
    decode_string_content,
    find_versions,
    predict,
    tensor_to_ndarray,
    write_tensor,
)
from gateway.model.testmodels import make_example
from tests.model.conftest import predict_request

NUMERIC_DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
]


@pytest.mark.parametrize("as_tensor_content", [False, True], ids=["typed", "content"])
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_write_tensor_round_trips_every_numeric_dtype(dtype, as_tensor_content) -> None:
    array = (np.arange(12).reshape(3, 4) % 5).astype(dtype)
    proto = tensor_pb2.TensorProto()
    write_tensor(array, tf.as_dtype(dtype).as_datatype_enum, proto, as_tensor_content)
    assert bool(proto.tensor_content) == as_tensor_content
    decoded = tf.make_ndarray(proto)
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)


def test_typed_float_output_is_float_val() -> None:
    proto = tensor_pb2.TensorProto()
    write_tensor(np.array([[1.5, -2.0]], np.float32), types_pb2.DT_FLOAT, proto, as_tensor_content=False)
    assert list(proto.float_val) == [1.5, -2.0]
    assert [d.size for d in proto.tensor_shape.dim] == [1, 2]


@pytest.mark.parametrize("as_tensor_content", [False, True], ids=["typed", "content"])
def test_string_tensors_round_trip(as_tensor_content) -> None:
    array = np.array([b"a", b"", b"\x00\xffxyz"], dtype=object)
    proto = tensor_pb2.TensorProto()
    write_tensor(array, types_pb2.DT_STRING, proto, as_tensor_content)
    assert list(tensor_to_ndarray(proto)) == list(array)


def test_string_tensor_content_is_varint_lengths_then_bytes() -> None:
    assert decode_string_content(b"\x01\x03\x00abcd", 3) == [b"a", b"bcd", b""]
    with pytest.raises(ValueError):
        decode_string_content(b"\x01\x03abc", 2)


def test_predict_can_answer_in_tensor_content(registry) -> None:
    request = predict_request("classifier", {"x": np.ones((2, 4), np.float32)})
    response = predict(registry, request, as_tensor_content=True)
    assert response.outputs["scores"].tensor_content and not response.outputs["scores"].float_val
    assert tf.make_ndarray(response.outputs["scores"]).shape == (2, 3)


def test_predict_accepts_strings_in_tensor_content(registry) -> None:
    examples = np.array([make_example([0, 0, 1, 0]), make_example([1, 0, 0, 0])], dtype=object)
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "classifier", "classify"
    write_tensor(examples, types_pb2.DT_STRING, request.inputs["inputs"], as_tensor_content=True)
    response = predict(registry, request, as_tensor_content=False)
    assert tf.make_ndarray(response.outputs["scores"]).argmax(axis=1).tolist() == [2, 0]


def test_the_method_name_check_refuses_nothing_that_is_a_serving_method(registry) -> None:
    request = predict_request("classifier", {"x": np.ones((1, 4), np.float32)})
    response = predict(registry, request, as_tensor_content=False, check_method_name=True)
    assert response.model_spec.version.value == 2


def test_errors_carry_grpc_codes(registry) -> None:
    with pytest.raises(ServingError) as caught:
        predict(
            registry, predict_request("nope", {"x": np.ones((1, 1), np.float32)}), as_tensor_content=False
        )
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_only_numeric_directories_with_a_saved_model_are_versions(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "1").symlink_to((model_dir / "echo" / "1").resolve(), target_is_directory=True)
    (tmp_path / "2").mkdir()  # no saved_model.pb: not a version yet
    (tmp_path / "latest").symlink_to((model_dir / "echo" / "1").resolve(), target_is_directory=True)
    (tmp_path / "notes.json").write_text("{}")
    assert list(find_versions(tmp_path)) == [1]


def test_a_base_path_without_models_is_refused_with_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(TfshieldError, match=r"expected .*/<name>/<version>/saved_model.pb"):
        ModelRegistry.load(tmp_path)


def test_a_missing_base_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TfshieldError, match="is not a directory"):
        ModelRegistry.load(tmp_path / "nope")


def test_classify_merges_the_shared_context_into_every_example(registry) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "classifier", "classify"
    with_context = request.input.example_list_with_context
    with_context.context.ParseFromString(make_example([0, 0, 9, 0]))
    with_context.examples.add()
    with_context.examples.add()
    response = classify(registry, request)
    winners = [max(row.classes, key=lambda c: c.score).label for row in response.result.classifications]
    assert winners == ["two", "two"]


def test_the_method_name_check_refuses_a_regress_signature_for_classify(registry) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "classifier", "regress"
    request.input.example_list.examples.add().ParseFromString(make_example([1, 2, 3, 4]))
    with pytest.raises(ServingError) as caught:
        classify(registry, request, check_method_name=True)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        "Expected classification signature method_name to be tensorflow/serving/classify. "
        "Was: tensorflow/serving/regress"
    )
