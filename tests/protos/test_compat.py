"""Our wire-compatible protos declare every field exactly as TF Serving does."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2 as tf_tensor_shape_pb2
from tensorflow.core.framework import types_pb2 as tf_types_pb2
from tensorflow.core.protobuf import meta_graph_pb2 as tf_meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    regression_pb2,
)
from tensorflow_serving.apis import (
    model_pb2 as tf_model_pb2,
)
from tensorflow_serving.apis import (
    predict_pb2 as tf_predict_pb2,
)

from protos import (
    meta_graph_pb2,
    model_pb2,
    predict_pb2,
    requests_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)

PAIRS = [
    (predict_pb2.PredictRequest, tf_predict_pb2.PredictRequest),
    (predict_pb2.PredictResponse, tf_predict_pb2.PredictResponse),
    (tensor_pb2.TensorProto, tf_tensor_pb2.TensorProto),
    (tensor_shape_pb2.TensorShapeProto, tf_tensor_shape_pb2.TensorShapeProto),
    (tensor_shape_pb2.TensorShapeProto.Dim, tf_tensor_shape_pb2.TensorShapeProto.Dim),
    (model_pb2.ModelSpec, tf_model_pb2.ModelSpec),
    (meta_graph_pb2.TensorInfo, tf_meta_graph_pb2.TensorInfo),
    (meta_graph_pb2.SignatureDef, tf_meta_graph_pb2.SignatureDef),
    (meta_graph_pb2.SignatureDefMap, get_model_metadata_pb2.SignatureDefMap),
    (meta_graph_pb2.GetModelMetadataRequest, get_model_metadata_pb2.GetModelMetadataRequest),
    (meta_graph_pb2.GetModelMetadataResponse, get_model_metadata_pb2.GetModelMetadataResponse),
    (requests_pb2.ClassificationRequest, classification_pb2.ClassificationRequest),
    (requests_pb2.RegressionRequest, regression_pb2.RegressionRequest),
    (requests_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceRequest),
    (requests_pb2.InferenceTask, inference_pb2.InferenceTask),
    (requests_pb2.GetModelStatusRequest, get_model_status_pb2.GetModelStatusRequest),
]


def _field_signature(field) -> tuple:
    message = field.message_type.name if field.message_type is not None else None
    enum = field.enum_type.name if field.enum_type is not None else None
    return (field.name, field.type, field.is_repeated, field.is_packed, message, enum)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[1].DESCRIPTOR.full_name for p in PAIRS])
def test_every_declared_field_matches_the_official_descriptor(ours, theirs) -> None:
    ours_d: Descriptor = ours.DESCRIPTOR
    theirs_d: Descriptor = theirs.DESCRIPTOR
    assert ours_d.fields, "a message with no fields proves nothing"
    for field in ours_d.fields:
        official_field = theirs_d.fields_by_number.get(field.number)
        assert official_field is not None, (
            f"{ours_d.name}.{field.name} = {field.number} is not in {theirs_d.full_name}"
        )
        assert _field_signature(field) == _field_signature(official_field)


def test_our_protos_live_in_their_own_package() -> None:
    # Never tensorflow.*: both sets of descriptors share one process in these tests.
    for ours, _ in PAIRS:
        assert ours.DESCRIPTOR.full_name.startswith("tfshield.serving.")


def test_every_data_type_we_declare_has_tensorflows_number() -> None:
    for value in types_pb2.DataType.DESCRIPTOR.values:
        assert tf_types_pb2.DataType.Value(value.name) == value.number


def test_a_request_with_fields_we_do_not_declare_survives_a_round_trip() -> None:
    request = tf_predict_pb2.PredictRequest(client_id=b"abc")
    request.model_spec.name = "mnist"
    raw = request.SerializeToString()
    ours = predict_pb2.PredictRequest.FromString(raw)
    assert ours.model_spec.name == "mnist"
    assert tf_predict_pb2.PredictRequest.FromString(ours.SerializeToString()).client_id == b"abc"
