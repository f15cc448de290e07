"""Fixtures for end-to-end gateway tests: a real gateway process in front of
the real reference model server (``model_server`` from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.procs import Proc, start, tfshield_argv

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def start_gateway(
    workdir: Path,
    upstream: str,
    name: str = "gateway",
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start ``tfshield serve`` on ephemeral ports in front of ``upstream``."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = tfshield_argv("serve", "--upstream", upstream, "--port", "0", "--metrics-port", "0")
    if config:
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += ["--config", str(path)]
    return start(argv, workdir, name, timeout_s=30, env=env)


def raw_unary(address: str, path: str, request: bytes, **kwargs: Any) -> tuple[bytes, Any]:
    """Call ``path`` with raw bytes; returns (response bytes, call) for metadata checks."""
    with grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)],
    ) as channel:
        response, call = channel.unary_unary(path).with_call(request, **kwargs)
        return response, call


@pytest.fixture(scope="session")
def gateway(model_server: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_gateway(tmp_path_factory.mktemp("gateway"), model_server.address())
    yield proc
    proc.stop()


@pytest.fixture()
def gateway_channel(gateway: Proc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.address()) as channel:
        yield channel


@pytest.fixture()
def spare_model_server(model_dir: Path) -> Iterator[Any]:
    """Start extra model servers a test may stop (``model_server`` is shared)."""
    procs: list[Proc] = []

    def make(workdir: Path) -> Proc:
        workdir.mkdir(parents=True, exist_ok=True)
        argv = tfshield_argv("model-server", "--model-base-path", str(model_dir), "--port", "0")
        proc = start(argv, workdir, "spare-model-server")
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()


# Shared fixtures defined elsewhere, made available to every gateway test. At the
# end of the module: detect_fixtures imports start_gateway from here.
from tests.gateway.detect_fixtures import reference  # noqa: E402, F401
from tests.redis_fixtures import redis_server, redis_url  # noqa: E402, F401
