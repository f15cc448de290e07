"""peek_model_name reads model_spec.name without parsing the request."""

from __future__ import annotations

import pytest

from gateway.decode import peek_model_name
from protos import meta_graph_pb2, model_pb2, predict_pb2, requests_pb2


def test_predict_model_name_is_found_behind_large_inputs() -> None:
    request = predict_pb2.PredictRequest()
    request.inputs["x"].tensor_content = b"\0" * 100_000
    request.model_spec.name = "mnist"
    assert peek_model_name(request.SerializeToString(), "Predict") == "mnist"


@pytest.mark.parametrize(
    "method, message",
    [
        ("Classify", requests_pb2.ClassificationRequest(model_spec=model_pb2.ModelSpec(name="c"))),
        ("Regress", requests_pb2.RegressionRequest(model_spec=model_pb2.ModelSpec(name="c"))),
        ("GetModelStatus", requests_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="c"))),
        (
            "GetModelMetadata",
            meta_graph_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="c")),
        ),
        (
            "MultiInference",
            requests_pb2.MultiInferenceRequest(
                tasks=[requests_pb2.InferenceTask(model_spec=model_pb2.ModelSpec(name="c"), method_name="m")]
            ),
        ),
    ],
)
def test_every_method_with_a_model_spec_is_peeked(method, message) -> None:
    assert peek_model_name(message.SerializeToString(), method) == "c"


def test_version_and_signature_do_not_confuse_the_peek() -> None:
    spec = model_pb2.ModelSpec(signature_name="sig", version_label="stable")
    spec.version.value = 7
    spec.name = "m"
    assert peek_model_name(predict_pb2.PredictRequest(model_spec=spec).SerializeToString(), "Predict") == "m"


@pytest.mark.parametrize("raw", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0b\x0c", b"\xff" * 20])
def test_malformed_bytes_give_an_empty_name_and_never_raise(raw) -> None:
    assert peek_model_name(raw, "Predict") == ""
