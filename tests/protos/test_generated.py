"""The committed *_pb2.py modules are exactly what ``python -m protos.build`` makes."""

from __future__ import annotations

import subprocess
import sys

from protos import build
from tests.procs import REPO


def test_generated_modules_are_up_to_date() -> None:
    # In a subprocess: grpc_tools' protoc crashes in a process that has loaded TensorFlow.
    result = subprocess.run(
        [sys.executable, "-m", "protos.build", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_every_proto_file_has_a_generated_module() -> None:
    names = {p.stem for p in build.proto_files()}
    generated = {p.name.removesuffix("_pb2.py") for p in build.PROTO_DIR.glob("*_pb2.py")}
    assert names == generated
