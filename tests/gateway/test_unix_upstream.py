"""The sidecar topology of deploy/: the gateway reaches the model server over a unix socket.

TF Serving in the pod listens only on ``--grpc_socket_path``; the reference
model server's ``--grpc-socket-path`` does the same, so this path is tested
against a real server, not only validated as config.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import TfshieldError
from tests.gateway.conftest import PREDICT, raw_unary, start_gateway
from tests.gateway.test_server import digits, predict_request
from tests.procs import Proc, start, tfshield_argv


def _serve_on_socket(model_dir: Path, workdir: Path, socket_path: Path, name: str) -> Proc:
    argv = tfshield_argv(
        "model-server", "--model-base-path", str(model_dir), "--port", "0",
        "--grpc-socket-path", str(socket_path),
    )  # fmt: skip
    return start(argv, workdir, name)


@pytest.fixture()
def socket_server(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Proc, Path]]:
    socket_path = tmp_path / "grpc.sock"
    proc = _serve_on_socket(model_dir, tmp_path, socket_path, "socket-model-server")
    yield proc, socket_path
    proc.stop()


def test_predict_through_a_unix_socket_upstream_is_byte_identical(
    socket_server: tuple[Proc, Path], tmp_path: Path
) -> None:
    server, socket_path = socket_server
    assert server.info["grpc_socket_path"] == str(socket_path)
    assert socket_path.is_socket()
    gateway = start_gateway(tmp_path / "gw", f"unix://{socket_path}")
    try:
        raw = predict_request("mnist", {"images": digits(3)}).SerializeToString()
        direct, _ = raw_unary(server.address(), PREDICT, raw, timeout=30)
        over_socket, _ = raw_unary(f"unix://{socket_path}", PREDICT, raw, timeout=30)
        through, _ = raw_unary(gateway.address(), PREDICT, raw, timeout=30)
        assert len(direct) > 0
        assert over_socket == direct
        assert through == direct
        with grpc.insecure_channel(gateway.address()) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gateway.stop()


def test_a_stale_socket_from_an_earlier_run_is_replaced(model_dir: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "grpc.sock"
    first = _serve_on_socket(model_dir, tmp_path / "first", socket_path, "first")
    first.signal(signal.SIGKILL)  # a crash: no clean shutdown removes the socket
    first.wait(30)
    assert socket_path.is_socket()
    second = _serve_on_socket(model_dir, tmp_path / "second", socket_path, "second")
    try:
        raw = predict_request("mnist", {"images": digits(1)}).SerializeToString()
        answer, _ = raw_unary(f"unix://{socket_path}", PREDICT, raw, timeout=30)
        assert len(answer) > 0
    finally:
        second.stop()


def test_a_path_that_is_not_a_socket_is_refused_and_kept(model_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("not a socket")
    with pytest.raises(TfshieldError, match="is not a socket"):
        _serve_on_socket(model_dir, tmp_path, victim, "refusing")
    assert victim.read_text() == "not a socket"


def test_a_missing_directory_is_refused(model_dir: Path, tmp_path: Path) -> None:
    argv = tfshield_argv(
        "model-server", "--model-base-path", str(model_dir), "--port", "0",
        "--grpc-socket-path", str(tmp_path / "absent" / "grpc.sock"),
    )  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"no directory {tmp_path / 'absent'}" in result.stderr
