"""The ``tfshield`` command. Each subcommand's module is imported only when it
runs, so ``tfshield serve`` never pays for TensorFlow."""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def use_gateway_grpc_io_path() -> None:
    """Choose gRPC's older I/O path for this process, before grpc loads.

    gRPC's EventEngine hands every call between threads (~15 context switches
    per proxied call); the older I/O path halves them and cut the gateway's CPU
    per call by ~25% and its added p50 by ~0.2 ms in `tfshield bench`.
    Experimental gRPC switches: set GRPC_EXPERIMENTS yourself to override (an
    empty value keeps gRPC's defaults).
    """
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)

# subcommand -> (module with ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.server", "run the gateway in front of a TF Serving upstream"),
    "demo": (
        "gateway.model.demo",
        "train the demo model once, then serve it behind the gateway with traffic",
    ),
    "model-server": (
        "gateway.model.server",
        "serve SavedModels over TF Serving's gRPC API (reference server)",
    ),
    "bench": ("gateway.bench", "benchmark direct vs gateway vs nginx; prints a table, writes JSON"),
    "admin": ("gateway.admin", "query and steer a running gateway through its control API"),
    "calibrate": ("gateway.model.calibrate", "fit and calibrate detectors against a running upstream"),
    "eval": ("gateway.model.evaluate", "attack the demo model through the gateway and report detection"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: tfshield COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "tfshield COMMAND --help describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tfshield: unknown command '{name}'; known: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    if name == "serve":
        # One BLAS thread: a sidecar shares its cores with the model server, and
        # BLAS threads contending for them turned 5 µs/sample scoring into
        # 3-24 ms spikes. Set before numpy loads; an explicit setting wins.
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, "1")
        use_gateway_grpc_io_path()
    elif name in ("eval", "calibrate"):
        # eval starts child servers and stops them in ``finally`` blocks (calibrate
        # closes its upstream channel in ``with`` blocks); Python's default SIGTERM
        # kills without running them, orphaning the children.
        # Exit through SystemExit instead (``serve`` and ``model-server`` drain
        # on SIGTERM themselves; ``demo`` and ``bench`` set their own handlers).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exc:
        if _terminated_by is None:
            raise
        # The SIGTERM unwound through the command's ``finally`` blocks, which
        # stopped its child servers. Skip interpreter finalization: it waits on
        # library threads (TensorFlow's, gRPC's), and a CI run once saw an
        # evaluation still running 60 s after SIGTERM.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 128 + _terminated_by)


# -- SIGTERM for the commands that start child servers ------------------------------------------

# Seconds a SIGTERM'd eval or calibrate may take to stop its servers (each gets
# 10 s, then SIGKILL) before a watchdog thread in C prints every thread's stack
# and exits with status 1.
SIGTERM_DEADLINE_S = 60.0
# How soon an exit that a __del__ or a callback swallowed is raised again.
REARM_S = 0.05
_terminated_by: int | None = None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Unwind through the command's ``finally`` blocks with SystemExit(128 + signum), once.

    Python runs a signal handler wherever the main thread is, and that may be
    inside a ``__del__`` or a callback from C, which print the exception and
    drop it. The command would then go on as if no SIGTERM had come. The
    unraisable hook installed here notices the dropped SystemExit and raises it
    again, via SIGALRM, 50 ms later in the command's own code.
    """
    global _terminated_by
    if _terminated_by is not None:
        return  # already unwinding: a second SIGTERM must not cut the cleanup short
    _terminated_by = signum
    faulthandler.dump_traceback_later(SIGTERM_DEADLINE_S, exit=True)
    previous_hook = sys.unraisablehook

    def reraise_dropped_exit(unraisable: object) -> None:
        previous_hook(unraisable)  # type: ignore[arg-type]
        if getattr(unraisable, "exc_type", None) is SystemExit:
            signal.setitimer(signal.ITIMER_REAL, REARM_S)

    sys.unraisablehook = reraise_dropped_exit
    signal.signal(signal.SIGALRM, _raise_exit_again)
    raise SystemExit(128 + signum)


def _raise_exit_again(signum: int, frame: object) -> None:
    raise SystemExit(128 + (_terminated_by or signal.SIGTERM))


if __name__ == "__main__":
    sys.exit(main())
