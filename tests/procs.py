"""Start and stop the servers a test needs, as real processes on loopback.

Every server is started with ``--ready-file`` and port 0, waited for through
that file, and stopped by its pid (SIGTERM, then SIGKILL after a grace
period), so no test leaves a process behind or depends on a fixed port. The
mechanism is the demo's own (:mod:`gateway.model.processes`); this module
gives it the names the tests use.
"""

from __future__ import annotations

from pathlib import Path

from gateway.model.processes import SOURCE_ROOT, ServerProcess, start_server, tfshield_command

REPO = SOURCE_ROOT
Proc = ServerProcess


def tfshield_argv(*args: str) -> list[str]:
    """The ``tfshield`` CLI run by this interpreter (no reliance on PATH)."""
    return tfshield_command(*args)


def start(
    argv: list[str],
    workdir: Path,
    name: str,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """Run ``argv + ["--ready-file", F]`` and wait until F appears (output in ``workdir/<name>.log``)."""
    return start_server(argv, workdir, name, timeout_s, env)
