"""Fixtures and helpers for the model-side tests: stock TF Serving stubs on the
shared reference model server, and the same models loaded in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    input_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from gateway.model.testmodels import make_example
from tests.procs import Proc

BIG_MESSAGES = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


def predict_request(model: str, inputs: dict[str, np.ndarray], **spec: Any) -> predict_pb2.PredictRequest:
    """A PredictRequest for ``model``; ``spec`` sets ModelSpec fields (``version=2`` sets version.value)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return request


def examples_input(features: np.ndarray) -> input_pb2.Input:
    """An Input of tf.Examples with float feature ``x`` = each row of ``features`` (n, 4)."""
    model_input = input_pb2.Input()
    for row in features:
        model_input.example_list.examples.add().ParseFromString(make_example(row))
    return model_input


@pytest.fixture(scope="session")
def channel(model_server: Proc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(model_server.address(), options=BIG_MESSAGES) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="session")
def model_stub(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="session")
def registry(model_dir: Path) -> Any:
    """The same models loaded in this process, for calling the server's functions directly."""
    from gateway.model.server import ModelRegistry

    return ModelRegistry.load(model_dir)


@pytest.fixture(scope="session")
def held_out_digits(model_cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from gateway.model.demo import DemoArtifacts

    return DemoArtifacts.at(model_cache_dir).load_test_split()
