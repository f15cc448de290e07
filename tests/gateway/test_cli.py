"""The ``tfshield`` command's dispatch and its SIGTERM path for the commands that start servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from gateway.cli import main, usage
from tests.procs import REPO

# A stand-in subcommand: it leaves a non-daemon thread running (as a library may),
# then gets SIGTERM while its ``finally`` block still has work to do.
_STUCK_THREAD_COMMAND = textwrap.dedent(
    """
    import os, signal, sys, threading, time, types

    import gateway.cli as cli

    def command(argv):
        threading.Thread(target=threading.Event().wait, name="never-ends").start()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            print("not interrupted", flush=True)
        finally:
            print("finally ran", flush=True)
        return 0

    sys.modules["stand_in"] = types.SimpleNamespace(main=command)
    cli.SUBCOMMANDS["eval"] = ("stand_in", "")
    sys.exit(cli.main(["eval"]))
    """
)


def test_sigterm_runs_the_commands_finally_blocks_then_exits_without_waiting_on_threads() -> None:
    # Python's own exit joins every non-daemon thread: without the CLI's exit
    # after the unwind, this child would never end.
    result = subprocess.run(
        [sys.executable, "-c", _STUCK_THREAD_COMMAND],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stdout.splitlines() == ["finally ran"]


# The SIGTERM lands while a __del__ runs: Python prints the SystemExit raised
# there ("Exception ignored in") and drops it.
_EXIT_DROPPED_IN_DEL_COMMAND = textwrap.dedent(
    """
    import gc, os, signal, sys, time, types

    import gateway.cli as cli

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at one of these loop turns
                pass

    def command(argv):
        try:
            SignalledWhileCollected()  # collected at once
            time.sleep(30)
            print("not interrupted", flush=True)
        finally:
            print("finally ran", flush=True)
        return 0

    sys.modules["stand_in"] = types.SimpleNamespace(main=command)
    cli.SUBCOMMANDS["eval"] = ("stand_in", "")
    sys.exit(cli.main(["eval"]))
    """
)


def test_a_sigterm_whose_exit_a_del_method_dropped_still_stops_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_DROPPED_IN_DEL_COMMAND],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Exception ignored in" in result.stderr, result.stderr  # the case this test is about happened
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stdout.splitlines() == ["finally ran"]


def test_unknown_commands_and_help() -> None:
    assert main(["nonsense"]) == 2
    assert main(["--help"]) == 0
    assert main([]) == 2
    assert "serve" in usage() and "eval" in usage()
