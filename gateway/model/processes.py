"""Start and stop tfshield servers as child processes (the demo, the evaluations, the bench, the tests).

Each server is started with ``--ready-file`` and port 0, waited for through
that file (see :mod:`gateway.readyfile`), and stopped by its pid: SIGTERM,
then SIGKILL after a grace period. Children get their own session, so a
Ctrl-C in the terminal reaches only the parent, which then stops them in
order (gateway first, then the model server behind it).

The test suite uses it too (``tests/procs.py`` re-exports it), so the
shipped package and the tests start servers one way.

:func:`unwind_on` is how the commands that start children (demo, eval,
bench) turn a signal into an exception, so that their ``finally`` blocks stop
those children before the process ends.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import TfshieldError

# The directory holding the ``gateway`` package, so ``python -m gateway.cli``
# works in a child even when tfshield is not installed.
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent
LOG_TAIL_CHARS = 4000


@dataclass
class ServerProcess:
    """A running server: its process, what its ready file said, and where it logs."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def port(self, kind: str = "grpc") -> int:
        """The port the server reported as ``<kind>_port`` (``grpc``, ``metrics``)."""
        return int(self.info[f"{kind}_port"])

    def address(self, kind: str = "grpc") -> str:
        return f"127.0.0.1:{self.port(kind)}"

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout_s)

    def log(self) -> str:
        """Everything the server has written to its log so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        return stop_process(self.popen, grace_s)


def stop_process(popen: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
    """Stop a child by its pid: SIGTERM, wait up to ``grace_s``, then SIGKILL; its exit code."""
    if popen.poll() is None:
        try:
            os.kill(popen.pid, signal.SIGTERM)
            popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)
            popen.wait(5)
        except ProcessLookupError:
            pass
    return popen.returncode


def tfshield_command(*args: str) -> list[str]:
    """The ``tfshield`` CLI run by this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "gateway.cli", *args]


def start_server(
    argv: list[str],
    workdir: Path,
    name: str,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Run ``argv + ["--ready-file", F]`` with output to ``workdir/<name>.log``; wait until F appears.

    Raises TfshieldError, with the end of the server's log, if it exits or is
    not ready within ``timeout_s``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ready_path = workdir / f"{name}.ready.json"
    ready_path.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    python_path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": python_path, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [*argv, "--ready-file", str(ready_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = ServerProcess(name, popen, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready_path.exists():
            if popen.poll() is not None:
                raise TfshieldError(
                    f"{name} exited with code {popen.returncode} before it was ready; "
                    f"its log ({log_path}) ends with:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TfshieldError(
                    f"{name} was not ready after {timeout_s:.0f} s; "
                    f"its log ({log_path}) ends with:\n{server.log_tail()}"
                )
            time.sleep(0.05)
        server.info = json.loads(ready_path.read_text())
    except BaseException:  # not ready, or interrupted while waiting: never leave it running
        server.stop()
        raise
    return server


# -- redis-server (tests and the bench share it) ------------------------------------------------

REDIS_START_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    """A ``redis-server`` on a unix socket: no TCP port (it cannot report an ephemeral one), the
    socket open to this user only, no persistence."""

    popen: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self, grace_s: float = 5.0) -> None:
        stop_process(self.popen, grace_s)


def _answers_ping(path: Path) -> bool:
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(0.5)
            conn.connect(str(path))
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(binary: str, workdir: Path, timeout_s: float = REDIS_START_TIMEOUT_S) -> RedisServer:
    """Start ``binary`` (redis-server) on ``workdir``/redis.sock and wait until it answers PING.

    Raises TfshieldError (and stops it) when it exits or stays silent; the caller stops it otherwise.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = workdir / "redis.sock"
    log_path = workdir / "redis.log"
    argv = [
        binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log_path),
    ]  # fmt: skip
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=workdir)
    server = RedisServer(popen, socket_path, log_path)
    deadline = time.monotonic() + timeout_s
    while not (socket_path.exists() and _answers_ping(socket_path)):
        if popen.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise TfshieldError(f"redis-server exited with {popen.returncode} before it was ready:\n{log}")
        if time.monotonic() > deadline:
            server.stop()
            raise TfshieldError(f"redis-server did not answer PING within {timeout_s:.0f} s")
        time.sleep(0.02)
    return server


def flushing_print(line: str) -> None:
    """The model-side commands' progress lines, printed now (they run for minutes, often piped); if
    stdout is gone (a closed pipe), carry on so the clean-up still runs."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, ValueError):
        pass


# -- turning a signal into an exception the caller's finally blocks see ----------------------------

# Seconds the unwind may take (stopping each child: 10 s, then SIGKILL) before a
# watchdog thread in C prints every thread's stack and exits with status 1.
UNWIND_DEADLINE_S = 60.0
# How soon an exception that a __del__ or a callback dropped is raised again.
REARM_S = 0.05
_unwound_by: int | None = None


def unwind_on(signals: Iterable[int], exception: Callable[[int], BaseException]) -> Callable[[], None]:
    """Make the first of ``signals`` to arrive raise ``exception(signum)`` in the main thread.

    Later signals are ignored, so they cannot cut the clean-up short. Python
    runs a signal handler wherever the main thread is, and that may be inside a
    ``__del__`` or a callback from C, which print the exception and drop it: the
    command would then go on as if no signal had come. An unraisable hook
    notices the dropped exception and raises it again, via SIGALRM, 50 ms later
    in the command's own code. Returns a function that restores the previous
    handlers (for a command that stops listening once its children are gone).
    """
    def handler(signum: int, frame: object) -> None:
        global _unwound_by
        if _unwound_by is not None:
            return
        _unwound_by = signum
        raised = exception(signum)
        faulthandler.dump_traceback_later(UNWIND_DEADLINE_S, exit=True)
        previous_hook = sys.unraisablehook

        def raise_dropped_again(unraisable: sys.UnraisableHookArgs) -> None:
            previous_hook(unraisable)
            if type(unraisable.exc_value) is type(raised):
                signal.setitimer(signal.ITIMER_REAL, REARM_S)

        def raise_again(alarm: int, frame: object) -> None:
            raise exception(signum)

        sys.unraisablehook = raise_dropped_again
        signal.signal(signal.SIGALRM, raise_again)
        raise raised

    previous = {sig: signal.signal(sig, handler) for sig in signals}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def signal_exit(signum: int) -> SystemExit:
    """SystemExit with the status a shell reports for death by ``signum`` (128 + signum)."""
    return SystemExit(128 + signum)


def unwound_by() -> int | None:
    """The signal :func:`unwind_on` turned into an exception, if one came."""
    return _unwound_by
