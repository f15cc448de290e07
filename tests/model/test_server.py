"""The reference model server over gRPC, with the stock TF Serving stubs: it must
answer like TensorFlow Serving (codes and messages from its sources) and
provide the test hooks other tests rely on."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from gateway.model import testhooks
from gateway.model.testmodels import CLASS_LABELS, expected_classifier_scores, expected_regression
from tests.model.conftest import BIG_MESSAGES, examples_input, predict_request
from tests.procs import Proc, start, tfshield_argv

FEATURES = np.array([[1.0, 0.0, 0.0, 5.0], [0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0]], np.float32)


def rpc_error(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30, **kwargs)
    return caught.value


def one_echo_request() -> predict_pb2.PredictRequest:
    return predict_request("echo", {"x": np.ones((1, 3), np.float32)})


# -- Predict ----------------------------------------------------------------------


def test_predict_classifies_held_out_digits(stub, held_out_digits) -> None:
    x, y = held_out_digits
    response = stub.Predict(predict_request("mnist", {"images": x[:200]}), timeout=30)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (200, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == y[:200]) >= 0.9


def test_predict_response_names_the_model_version_and_signature(stub) -> None:
    response = stub.Predict(
        predict_request("mnist", {"images": np.zeros((1, 28, 28, 1), np.float32)}), timeout=30
    )
    assert response.model_spec.name == "mnist"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert set(response.outputs) == {"probabilities", "logits"}


def test_a_request_without_version_gets_the_latest_version(stub) -> None:
    response = stub.Predict(predict_request("classifier", {"x": FEATURES}), timeout=30)
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["value"]), expected_regression(FEATURES, 2))


def test_a_request_for_a_version_gets_that_version(stub) -> None:
    response = stub.Predict(predict_request("classifier", {"x": FEATURES}, version=1), timeout=30)
    assert response.model_spec.version.value == 1
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["value"]), expected_regression(FEATURES, 1))


def test_outputs_are_typed_fields_by_default(stub) -> None:
    response = stub.Predict(predict_request("classifier", {"x": FEATURES}), timeout=30)
    scores, class_ids, labels = (response.outputs[k] for k in ("scores", "class_ids", "labels"))
    assert not scores.tensor_content and len(scores.float_val) == 9
    np.testing.assert_allclose(tf.make_ndarray(scores), expected_classifier_scores(FEATURES), rtol=1e-5)
    assert list(class_ids.int64_val) == [0, 1, 2]
    assert [label.decode() for label in labels.string_val] == list(CLASS_LABELS)


def test_unknown_model_is_not_found_with_tf_servings_message(stub) -> None:
    error = rpc_error(stub.Predict, predict_request("no-such-model", {"x": np.ones((1, 1), np.float32)}))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "Servable not found for request: Latest(no-such-model)"


def test_unknown_version_is_not_found_with_tf_servings_message(stub) -> None:
    error = rpc_error(stub.Predict, predict_request("mnist", {"images": np.zeros((1, 28, 28, 1))}, version=7))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "Servable not found for request: Specific(mnist, 7)"


def test_version_labels_are_unrecognized(stub) -> None:
    request = predict_request("mnist", {"images": np.zeros((1, 28, 28, 1))}, version_label="stable")
    error = rpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Unrecognized servable version label: stable"


def test_a_request_without_model_name_is_invalid(stub) -> None:
    error = rpc_error(stub.Predict, predict_request("", {"x": np.ones((1, 1), np.float32)}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "ModelSpec has no name specified."


def test_a_request_without_model_spec_is_invalid(stub) -> None:
    error = rpc_error(stub.Predict, predict_pb2.PredictRequest())
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def test_wrong_input_name_is_invalid_and_named(stub) -> None:
    error = rpc_error(
        stub.Predict, predict_request("mnist", {"pixels": np.zeros((1, 28, 28, 1), np.float32)})
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "Signature input alias: images(feed name: serving_default_images:0) not found in request and no "
        "default value provided. Inputs expected to be in the request {pixels}, or default input alias set: "
    )


def test_an_extra_input_is_invalid_and_named(stub) -> None:
    request = predict_request(
        "mnist", {"images": np.zeros((1, 28, 28, 1), np.float32), "extra": np.zeros((1,), np.float32)}
    )
    error = rpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "input size does not match signature: 2!=1 len({extra,images}) != len({images}). "
        "Sent extra: {extra}. Missing but required: {}."
    )


def test_a_wrong_dtype_is_invalid_with_tf_servings_message(stub) -> None:
    error = rpc_error(
        stub.Predict, predict_request("mnist", {"images": np.zeros((1, 28, 28, 1), np.float64)})
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Expects arg[0] to be float but double is provided"


def test_an_incompatible_shape_is_invalid_and_named(stub) -> None:
    error = rpc_error(stub.Predict, predict_request("mnist", {"images": np.zeros((1, 784), np.float32)}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("input tensor alias images has shape [1,784], which is not compatible")
    assert "[-1,28,28,1]" in error.details()


def test_a_malformed_tensor_is_a_parsing_error(stub) -> None:
    request = predict_request("mnist", {"images": np.zeros((2, 28, 28, 1), np.float32)})
    request.inputs["images"].tensor_content = request.inputs["images"].tensor_content[:-4]
    error = rpc_error(stub.Predict, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor parsing error: images",
    )


def test_an_unknown_signature_is_a_failed_precondition(stub) -> None:
    request = predict_request(
        "mnist", {"images": np.zeros((1, 28, 28, 1), np.float32)}, signature_name="nope"
    )
    error = rpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == 'Serving signature key "nope" not found.'


def test_output_filter_returns_only_the_named_outputs(stub) -> None:
    request = predict_request("mnist", {"images": np.zeros((1, 28, 28, 1), np.float32)})
    request.output_filter.append("logits")
    assert list(stub.Predict(request, timeout=30).outputs) == ["logits"]


def test_output_filter_with_an_unknown_output_is_invalid(stub) -> None:
    request = predict_request("mnist", {"images": np.zeros((1, 28, 28, 1), np.float32)})
    request.output_filter.append("nope")
    error = rpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "output tensor alias not found in signature: nope "
        "Outputs expected to be in the set {logits,probabilities}."
    )


def test_a_32_mib_request_to_echo_passes(stub) -> None:
    array = np.arange(8 * 1024 * 1024, dtype=np.float32).reshape(1024, 8192)
    request = predict_request("echo", {"x": array})
    assert request.ByteSize() > 32 * 1024 * 1024
    response = stub.Predict(request, timeout=120)
    assert np.array_equal(tf.make_ndarray(response.outputs["y"]), array)


# -- Classify, Regress, MultiInference -----------------------------------------------


def test_classify_returns_labels_and_scores(stub) -> None:
    request = classification_pb2.ClassificationRequest(
        model_spec={"name": "classifier", "signature_name": "classify"}, input=examples_input(FEATURES)
    )
    response = stub.Classify(request, timeout=30)
    assert response.model_spec.signature_name == "classify" and response.model_spec.version.value == 2
    labels = [[c.label for c in row.classes] for row in response.result.classifications]
    scores = np.array([[c.score for c in row.classes] for row in response.result.classifications])
    assert labels == [list(CLASS_LABELS)] * 3
    np.testing.assert_allclose(scores, expected_classifier_scores(FEATURES), rtol=1e-5)


def test_regress_returns_one_value_per_example(stub) -> None:
    request = regression_pb2.RegressionRequest(
        model_spec={"name": "classifier", "signature_name": "regress", "version": {"value": 1}},
        input=examples_input(FEATURES),
    )
    response = stub.Regress(request, timeout=30)
    values = [r.value for r in response.result.regressions]
    np.testing.assert_allclose(values, expected_regression(FEATURES, 1))
    assert response.model_spec.version.value == 1


def test_multi_inference_runs_classify_and_regress_on_one_input(stub) -> None:
    request = inference_pb2.MultiInferenceRequest(
        tasks=[
            inference_pb2.InferenceTask(
                model_spec={"name": "classifier", "signature_name": "classify"},
                method_name="tensorflow/serving/classify",
            ),
            inference_pb2.InferenceTask(
                model_spec={"name": "classifier", "signature_name": "regress"},
                method_name="tensorflow/serving/regress",
            ),
        ],
        input=examples_input(FEATURES),
    )
    response = stub.MultiInference(request, timeout=30)
    classification, regression = response.results
    assert [r.model_spec.signature_name for r in response.results] == ["classify", "regress"]
    assert len(classification.classification_result.classifications) == 3
    values = [r.value for r in regression.regression_result.regressions]
    np.testing.assert_allclose(values, expected_regression(FEATURES, 2))


def test_classify_on_a_predict_signature_is_invalid(stub) -> None:
    request = classification_pb2.ClassificationRequest(
        model_spec={"name": "classifier"}, input=examples_input(FEATURES)
    )
    error = rpc_error(stub.Classify, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Expected one or two output Tensors, found 4"


def test_classify_without_examples_is_invalid(stub) -> None:
    request = classification_pb2.ClassificationRequest(
        model_spec={"name": "classifier", "signature_name": "classify"}
    )
    error = rpc_error(stub.Classify, request)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")


def test_multi_inference_with_an_unsupported_method_is_unimplemented(stub) -> None:
    request = inference_pb2.MultiInferenceRequest(
        tasks=[
            inference_pb2.InferenceTask(
                model_spec={"name": "classifier"}, method_name="tensorflow/serving/predict"
            )
        ],
        input=examples_input(FEATURES),
    )
    error = rpc_error(stub.MultiInference, request)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == "Unsupported signature method_name: tensorflow/serving/predict"


# -- GetModelMetadata, GetModelStatus, reload ----------------------------------------


def test_metadata_returns_the_saved_models_signatures(stub) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": "mnist"}, metadata_field=["signature_def"]
    )
    response = stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == "mnist" and response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert set(signature_map.signature_def) == {"serving_default", "__saved_model_init_op"}
    serving = signature_map.signature_def["serving_default"]
    assert list(serving.inputs) == ["images"]
    assert [d.size for d in serving.inputs["images"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert set(serving.outputs) == {"probabilities", "logits"}
    assert serving.method_name == "tensorflow/serving/predict"


def test_metadata_without_fields_is_invalid(stub) -> None:
    error = rpc_error(
        stub.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "mnist"})
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "GetModelMetadataRequest must specify at least one metadata_field"


def test_metadata_with_an_unsupported_field_is_invalid(stub) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": "mnist"}, metadata_field=["nope"]
    )
    error = rpc_error(stub.GetModelMetadata, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Metadata field nope is not supported",
    )


def test_status_lists_every_loaded_version_as_available(model_stub) -> None:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "classifier"})
    response = model_stub.GetModelStatus(request, timeout=30)
    assert [s.version for s in response.model_version_status] == [2, 1]
    assert {s.state for s in response.model_version_status} == {
        get_model_status_pb2.ModelVersionStatus.AVAILABLE
    }


def test_status_of_an_unknown_model_is_not_found(model_stub) -> None:
    error = rpc_error(
        model_stub.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"})
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "Could not find any versions of model nope",
    )


def test_status_of_an_unknown_version_is_not_found(model_stub) -> None:
    request = get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": "mnist", "version": {"value": 9}}
    )
    error = rpc_error(model_stub.GetModelStatus, request)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "Could not find version 9 of model mnist",
    )


def test_reload_config_is_unimplemented(model_stub) -> None:
    error = rpc_error(model_stub.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# -- test hooks ------------------------------------------------------------------------


def test_the_counts_hook_counts_calls_per_method(channel, stub) -> None:
    before = testhooks.read_counts(channel)
    for _ in range(3):
        stub.Predict(one_echo_request(), timeout=30)
    rpc_error(stub.Predict, predict_request("no-such-model", {"x": np.ones((1, 1), np.float32)}))
    after = testhooks.read_counts(channel)
    assert after["Predict"] == before["Predict"] + 4
    assert after["Classify"] == before["Classify"]
    assert set(after) == set(testhooks.COUNTED_METHODS)


def test_echo_metadata_comes_back_as_trailers(stub) -> None:
    metadata = (("x-echo-trace", "abc-123"), ("x-echo-blob-bin", b"\x00\xff"), ("x-other", "no"))
    _, call = stub.Predict.with_call(one_echo_request(), metadata=metadata, timeout=30)
    trailers = tuple(call.trailing_metadata())
    assert ("x-tfshield-echo-trace", "abc-123") in trailers
    assert ("x-tfshield-echo-blob-bin", b"\x00\xff") in trailers
    assert not any("other" in key for key, _ in trailers)


def test_echo_metadata_comes_back_on_errors_too(stub) -> None:
    request = predict_request("no-such-model", {"x": np.ones((1, 1), np.float32)})
    error = rpc_error(stub.Predict, request, metadata=(("x-echo-trace", "on-error"),))
    assert ("x-tfshield-echo-trace", "on-error") in tuple(error.trailing_metadata())


def test_the_deadline_hook_reports_the_remaining_deadline(stub) -> None:
    _, call = stub.Predict.with_call(one_echo_request(), metadata=(("x-echo-deadline", "1"),), timeout=5.0)
    remaining_ms = float(dict(tuple(call.trailing_metadata()))["x-tfshield-deadline-ms"])
    # gRPC rounds the grpc-timeout header up, so the server may see a little more than 5 s.
    assert 3000 < remaining_ms <= 5100


def test_sleeping_past_the_client_deadline_gives_deadline_exceeded(stub) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(one_echo_request(), metadata=(("x-sleep-ms", "3000"),), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0


def test_sleeping_within_the_deadline_answers_late(stub) -> None:
    started = time.monotonic()
    stub.Predict(one_echo_request(), metadata=(("x-sleep-ms", "300"),), timeout=30)
    assert time.monotonic() - started >= 0.3


def test_a_bad_sleep_value_is_invalid(stub) -> None:
    error = rpc_error(stub.Predict, one_echo_request(), metadata=(("x-sleep-ms", "soon"),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-sleep-ms" in error.details()


# -- process lifecycle -----------------------------------------------------------------


def test_sigterm_lets_an_in_flight_call_finish(model_dir, tmp_path) -> None:
    echo_only = tmp_path / "models"
    echo_only.mkdir()
    (echo_only / "echo").symlink_to((model_dir / "echo").resolve(), target_is_directory=True)
    proc: Proc = start(
        tfshield_argv("model-server", "--model-base-path", str(echo_only), "--port", "0"), tmp_path, "spare"
    )
    outcome: dict[str, object] = {}

    def slow_call() -> None:
        with grpc.insecure_channel(proc.address(), options=BIG_MESSAGES) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                outcome["response"] = stub.Predict(
                    one_echo_request(), metadata=(("x-sleep-ms", "1000"),), timeout=20
                )
            except grpc.RpcError as exc:
                outcome["error"] = exc.code()

    try:
        worker = threading.Thread(target=slow_call)
        worker.start()
        with grpc.insecure_channel(proc.address()) as channel:
            deadline = time.monotonic() + 10
            while testhooks.read_counts(channel)["Predict"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # wait until the call is in flight, sleeping in the server
        proc.signal(signal.SIGTERM)
        worker.join(20)
        assert "response" in outcome, outcome
        assert proc.wait(15) == 0
    finally:
        proc.stop()
