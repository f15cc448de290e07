"""The decode stage: read only what the gateway needs from a raw request.

Two costs are kept apart. ``peek_model_name`` walks the protobuf wire format
just far enough to find ``model_spec.name`` (it is field 1 of every request
that names a model, so this usually reads a few dozen bytes, whatever the size
of the tensors behind it); it never raises. ``decode_predict`` parses a whole
PredictRequest and turns every input into a numpy array through
:mod:`gateway.codec`, rejecting malformed tensors with InvalidInput.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from gateway.codec import tensor_to_numpy
from gateway.errors import InvalidInput
from protos import predict_pb2

# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MODEL_SPEC = 1  # field number of model_spec in every request that has one
_TASKS = 1  # MultiInferenceRequest.tasks; InferenceTask.model_spec is field 1 too
_NAME = 1  # ModelSpec.name


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _find_field(buf: memoryview, number: int) -> memoryview | None:
    """The payload of the first length-delimited field ``number`` in ``buf``."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated field")
            if field_number == number:
                return buf[pos : pos + length]
            pos += length
        elif wire_type == _VARINT:
            _, pos = _varint(buf, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return None


def peek_model_name(raw: bytes, method: str) -> str:
    """``model_spec.name`` of a serialized request, or "" if it has none.

    For MultiInference the first task's model is used. Malformed bytes give ""
    (the upstream, which parses the request in full, reports the error).
    """
    try:
        buf = memoryview(raw)
        outer = _find_field(buf, _TASKS if method == "MultiInference" else _MODEL_SPEC)
        if outer is not None and method == "MultiInference":
            outer = _find_field(outer, _MODEL_SPEC)
        if outer is None:
            return ""
        name = _find_field(outer, _NAME)
        return "" if name is None else bytes(name).decode("utf-8", "replace")
    except (ValueError, IndexError):
        return ""


def parse_predict(raw: bytes) -> predict_pb2.PredictRequest:
    """Parse a PredictRequest, keeping unknown fields; InvalidInput if it is not one."""
    try:
        return predict_pb2.PredictRequest.FromString(raw)
    except DecodeError:
        raise InvalidInput("request", "is not a valid PredictRequest (protobuf parse failed)") from None


def decode_inputs(request: predict_pb2.PredictRequest, max_elements: int) -> dict[str, np.ndarray]:
    """Every input tensor of a PredictRequest as a numpy array, validated."""
    return {name: tensor_to_numpy(tensor, name, max_elements) for name, tensor in request.inputs.items()}
