"""peek_model_name reads model_spec.name without parsing the request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.decode import _walk_to_model_name, peek_model_name
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


METHODS = ("Predict", "Classify", "GetModelMetadata", "MultiInference")


@given(
    method=st.sampled_from(METHODS),
    name=st.text(max_size=140),
    signature=st.text(max_size=20),
    tail=st.binary(max_size=20),
    cut=st.integers(0, 300) | st.none(),
)
def test_the_in_place_read_agrees_with_the_walk(method, name, signature, tail, cut) -> None:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    raw = predict_pb2.PredictRequest(model_spec=spec).SerializeToString() + tail
    raw = raw if cut is None else raw[:cut]
    assert peek_model_name(raw, method) == _walk_to_model_name(raw, method)


@given(raw=st.binary(max_size=64), method=st.sampled_from(METHODS))
def test_any_bytes_peek_as_the_walk_does(raw, method) -> None:
    assert peek_model_name(raw, method) == _walk_to_model_name(raw, method)
