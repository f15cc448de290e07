"""The request pipeline: stages in a fixed order, as DESIGN.md draws it.

A stage sees a :class:`Call` on the way in (``on_request``, in order) and the
response bytes on the way out (``on_response``, in reverse order); forwarding
is terminal and lives in the server. A stage refuses a call by raising
:class:`Refusal` (or :class:`~gateway.errors.InvalidInput`); the server maps
those to gRPC statuses in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from gateway.decode import decode_inputs, parse_predict
from gateway.errors import TfshieldError
from protos import predict_pb2


class Refusal(TfshieldError):
    """A stage's decision not to serve a call. ``rule`` names the rule, never scores."""

    def __init__(self, code: grpc.StatusCode, message: str, rule: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rule = rule


@dataclass(slots=True)
class Call:
    """One request as it moves through the pipeline."""

    method: str  # short method name, e.g. "Predict"
    raw: bytes  # the request exactly as the client sent it
    model: str  # model_spec.name, "" if none
    client_id: str = ""
    # The client's remaining deadline when the call arrived, seconds (None: no deadline).
    timeout_s: float | None = None
    request: predict_pb2.PredictRequest | None = None
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    # What goes upstream instead of ``raw``, when a stage had to change the request
    # (model-in-the-loop detectors); None keeps the allow path byte-exact.
    forward_raw: bytes | None = None
    # Per-call state of the detect, monitor and policy stages.
    detect_state: Any = None
    monitor_state: Any = None
    policy_state: Any = None


class Stage:
    """Base of pipeline stages; both hooks default to doing nothing."""

    name = "stage"

    async def on_request(self, call: Call) -> None:
        return None

    async def on_response(self, call: Call, response: bytes) -> bytes:
        return response

    async def close(self) -> None:
        return None


class DecodeStage(Stage):
    """Parses Predict requests and decodes every input tensor, refusing malformed ones.

    Later stages (detectors) read ``call.inputs``. Other methods pass untouched:
    the upstream parses their inputs (tf.Example lists) itself.
    """

    name = "decode"

    def __init__(self, max_tensor_elements: int) -> None:
        self._max_elements = max_tensor_elements

    async def on_request(self, call: Call) -> None:
        if call.method == "Predict":
            call.request = parse_predict(call.raw)
            call.inputs = decode_inputs(call.request, self._max_elements)
