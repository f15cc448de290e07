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

from gateway.decode import LayoutCache, Span, decode_inputs, parse_predict, read_inputs
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
    # Set by the decode stage for a Predict: model_spec.signature_name, and its inputs
    # (``inputs``; read-only arrays, made on first use from the scan's spans).
    decoded: bool = False
    signature: str = ""
    # What goes upstream instead of ``raw``, when a stage had to change the request
    # (model-in-the-loop detectors); None keeps the allow path byte-exact.
    forward_raw: bytes | None = None
    # Per-call state of the detect, monitor and policy stages.
    detect_state: Any = None
    monitor_state: Any = None
    policy_state: Any = None
    _request: predict_pb2.PredictRequest | None = field(default=None, repr=False)
    _inputs: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _spans: dict[str, np.ndarray | Span] | None = field(default=None, repr=False)

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """The decoded Predict's inputs by name ({} for other calls)."""
        if self._inputs is None:
            self._inputs = {} if self._spans is None else read_inputs(self.raw, self._spans)
        return self._inputs

    @inputs.setter
    def inputs(self, arrays: dict[str, np.ndarray]) -> None:
        self._inputs = arrays

    @property
    def request(self) -> predict_pb2.PredictRequest | None:
        """The decoded Predict's message, parsed on first use (the decode stage's fast path
        makes none); None for other calls. InvalidInput if the bytes do not parse."""
        if self._request is None and self.decoded:
            self._request = parse_predict(self.raw)
        return self._request

    @request.setter
    def request(self, message: predict_pb2.PredictRequest | None) -> None:
        self._request = message


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
    """Decodes every input tensor of a Predict request, refusing malformed ones.

    Plainly written requests take :func:`~gateway.decode.scan_predict`'s fast
    path (no parse, no copy), and a layout seen before skips even that
    (:class:`~gateway.decode.LayoutCache`); the rest are parsed in full, which
    words every refusal. Later stages (detectors, monitors, the policy) read ``call.inputs``
    and ``call.signature``. Other methods pass untouched: the upstream parses
    their inputs (tf.Example lists) itself.
    """

    name = "decode"

    def __init__(self, max_tensor_elements: int) -> None:
        self._max_elements = max_tensor_elements
        self._layouts = LayoutCache(max_tensor_elements)

    async def on_request(self, call: Call) -> None:
        if call.method == "Predict":
            scanned = self._layouts.scan(call.raw)
            if scanned is None:
                request = call.request = parse_predict(call.raw)
                call.signature = request.model_spec.signature_name
                call.inputs = decode_inputs(request, self._max_elements)
            else:
                call.signature, call._spans = scanned
            call.decoded = True
