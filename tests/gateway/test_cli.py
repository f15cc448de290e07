"""The ``tfshield`` command's dispatch and its SIGTERM path for the commands that start servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from gateway.cli import main, usage
from tests.procs import REPO

# The stand-in for eval: it calls ``before()`` (which sends the SIGTERM), then
# sleeps; its ``finally`` block says it ran.
_STAND_IN = """
def command(argv):
    try:
        before()
        time.sleep(30)
        print("not interrupted", flush=True)
    finally:
        print("finally ran", flush=True)
    return 0
"""


def run_as_eval(before_source: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``tfshield eval`` in a child whose eval is the stand-in above, with ``before()`` from the test."""
    script = "\n".join(
        [
            "import os, signal, sys, threading, time, types",
            "import gateway.cli as cli",
            textwrap.dedent(before_source),
            _STAND_IN,
            'sys.modules["stand_in"] = types.SimpleNamespace(main=command)',
            'cli.SUBCOMMANDS["eval"] = ("stand_in", "")',
            'sys.exit(cli.main(["eval"]))',
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_sigterm_runs_the_commands_finally_blocks_then_exits_without_waiting_on_threads() -> None:
    # The command leaves a non-daemon thread running, as a library may. Python's
    # own exit joins every such thread: without the CLI's exit after the unwind,
    # this child would never end.
    result = run_as_eval(
        """
        def before():
            threading.Thread(target=threading.Event().wait, name="never-ends").start()
            os.kill(os.getpid(), signal.SIGTERM)
        """,
        timeout_s=20,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stdout.splitlines() == ["finally ran"]


def test_a_sigterm_whose_exit_a_del_method_dropped_still_stops_the_command() -> None:
    # The SIGTERM lands while a __del__ runs: Python prints the SystemExit
    # raised there ("Exception ignored in") and drops it.
    result = run_as_eval(
        """
        class SignalledWhileCollected:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at one of these loop turns
                    pass

        def before():
            SignalledWhileCollected()  # collected at once
        """,
        timeout_s=60,
    )
    assert "Exception ignored in" in result.stderr, result.stderr  # the case this test is about happened
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stdout.splitlines() == ["finally ran"]


def test_unknown_commands_and_help() -> None:
    assert main(["nonsense"]) == 2
    assert main(["--help"]) == 0
    assert main([]) == 2
    assert "serve" in usage() and "eval" in usage()
