"""The benchmark's floor proxy (gateway/floor.py) is a correct drop-in proxy, or its row means nothing.

``tfshield bench`` reads "gateway over the floor" as tfshield's own cost, so
the floor must do what a proxy must (bytes, metadata, deadline, status both
ways) against the real reference model server, and nothing may be missing
from it that the gateway's pass-through also has to do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.cli import GRPC_EXPERIMENTS
from tests.gateway.conftest import PREDICT, raw_unary
from tests.gateway.test_server import digits, predict_request
from tests.procs import Proc, start

METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"


@pytest.fixture(scope="module")
def floor(model_server: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    argv = [sys.executable, "-m", "gateway.floor", "--upstream", model_server.address(), "--port", "0"]
    proc = start(argv, tmp_path_factory.mktemp("floor"), "floor", timeout_s=30)
    yield proc
    proc.stop()


def test_responses_are_byte_identical_to_direct_for_every_method_it_is_asked(
    floor: Proc, model_server: Proc
) -> None:
    from tensorflow_serving.apis import get_model_metadata_pb2

    calls = {
        PREDICT: predict_request("mnist", {"images": digits(4)}).SerializeToString(),
        METADATA: get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "mnist"}, metadata_field=["signature_def"]
        ).SerializeToString(),
    }
    for path, raw in calls.items():
        direct, _ = raw_unary(model_server.address(), path, raw, timeout=30)
        through, _ = raw_unary(floor.address(), path, raw, timeout=30)
        assert len(direct) > 0, path
        assert through == direct, path


def test_status_and_message_come_back_unchanged(floor: Proc, model_server: Proc) -> None:
    raw = predict_request("no-such-model", {"images": digits(1)}).SerializeToString()
    errors = []
    for address in (model_server.address(), floor.address()):
        with pytest.raises(grpc.RpcError) as caught:
            raw_unary(address, PREDICT, raw, timeout=30)
        errors.append((caught.value.code(), caught.value.details()))
    assert errors[0][0] == grpc.StatusCode.NOT_FOUND
    assert errors[1] == errors[0]


def test_metadata_and_deadline_reach_the_upstream(floor: Proc) -> None:
    raw = predict_request("echo", {"x": np.ones((1, 3), np.float32)}).SerializeToString()
    metadata = (("x-echo-trace", "abc-123"), ("x-echo-deadline", "1"))
    _, call = raw_unary(floor.address(), PREDICT, raw, metadata=metadata, timeout=5.0)
    seen = dict(tuple(call.trailing_metadata()))
    assert seen["x-tfshield-echo-trace"] == "abc-123"
    # grpc-timeout is sent in coarse units, rounded up: allow a little over 5 s.
    assert 3000 < float(seen["x-tfshield-deadline-ms"]) <= 5100


def test_it_loads_no_tensorflow_and_runs_on_the_gateways_event_loop_and_grpc_io_path(
    floor: Proc, gateway: Proc
) -> None:
    maps = Path(f"/proc/{floor.pid}/maps").read_text()
    assert "tensorflow" not in maps
    try:
        import uvloop  # noqa: F401

        expected = "uvloop"
    except ImportError:
        expected = "asyncio"
    assert floor.info["event_loop"] == expected
    # The same GRPC_EXPERIMENTS as `tfshield serve` (an explicit setting wins in both).
    experiments = os.environ.get("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    assert floor.info["grpc_experiments"] == gateway.info["grpc_experiments"] == experiments
    # Both froze what start-up built before taking calls (no full collection walks it again).
    assert floor.info["gc_frozen"] > 0 and gateway.info["gc_frozen"] > 0
