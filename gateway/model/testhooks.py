"""The reference model server's test hooks, shared by the server and by tests.

No TensorFlow here: gateway-side tests import this module to talk to the hooks
without paying for the TensorFlow runtime. The hooks (see
:mod:`gateway.model.server`) let a test prove what a proxy in front of the
model server did:

``x-echo-<name>`` request metadata
    comes back as trailing metadata ``x-tfshield-echo-<name>`` with the same
    value (``-bin`` keys stay binary), on success and on error.
``x-echo-deadline`` request metadata (any value)
    adds trailing metadata ``x-tfshield-deadline-ms``: the client's remaining
    deadline in milliseconds when the call reached the server; absent when
    the call has no deadline.
``x-sleep-ms: N`` request metadata
    makes the server wait N milliseconds before answering; if the caller's
    deadline passes meanwhile the answer is DEADLINE_EXCEEDED.
``/tfshield.modelserver.Debug/Counts``
    a unary method with raw-bytes (identity) serialization; any request body
    returns JSON ``{"Predict": n, "Classify": n, ...}``: how many calls of
    each TF Serving method the server received since it started, failed ones
    included.
"""

from __future__ import annotations

import json

import grpc

ECHO_REQUEST_PREFIX = "x-echo-"
ECHO_TRAILER_PREFIX = "x-tfshield-echo-"
DEADLINE_ECHO_KEY = "x-echo-deadline"
DEADLINE_TRAILER_KEY = "x-tfshield-deadline-ms"
SLEEP_KEY = "x-sleep-ms"

DEBUG_SERVICE = "tfshield.modelserver.Debug"
COUNTS_METHOD_NAME = "Counts"
COUNTS_METHOD = f"/{DEBUG_SERVICE}/{COUNTS_METHOD_NAME}"

# Every TF Serving method the reference server counts, by its short name.
COUNTED_METHODS = (
    "Classify",
    "Regress",
    "Predict",
    "MultiInference",
    "GetModelMetadata",
    "GetModelStatus",
    "HandleReloadConfigRequest",
)


def read_counts(channel: grpc.Channel, timeout_s: float = 10.0) -> dict[str, int]:
    """How many calls of each method the model server behind ``channel`` has received."""
    raw = channel.unary_unary(COUNTS_METHOD)(b"", timeout=timeout_s)
    return {str(name): int(count) for name, count in json.loads(raw).items()}
