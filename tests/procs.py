"""Start and stop the servers a test needs, as real processes on loopback.

Every server is started with ``--ready-file`` and port 0, waited for through
that file, and stopped by its pid (SIGTERM, then SIGKILL after a grace period),
so no test leaves a process behind or depends on a fixed port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    info: dict[str, Any]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def port(self, name: str = "grpc") -> int:
        return int(self.info[f"{name}_port"])

    def address(self, name: str = "grpc") -> str:
        return f"127.0.0.1:{self.port(name)}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        return self.popen.returncode


def tfshield_argv(*args: str) -> list[str]:
    """The ``tfshield`` CLI run by this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "gateway.cli", *args]


def start(
    argv: list[str],
    workdir: Path,
    name: str,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """Run ``argv + ["--ready-file", F]`` and wait until F appears."""
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    full_argv = [*argv, "--ready-file", str(ready)]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(full_argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    proc = Proc(popen, {}, log_path, full_argv)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {popen.returncode} before it was ready:\n{proc.log()}")
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{name} not ready after {timeout_s}s:\n{proc.log()}")
        time.sleep(0.02)
    proc.info = json.loads(ready.read_text())
    return proc
