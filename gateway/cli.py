"""The ``tfshield`` command. Each subcommand's module is imported only when it
runs, so ``tfshield serve`` never pays for TensorFlow."""

from __future__ import annotations

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
        # kills without running them, orphaning the children. ``serve`` and
        # ``model-server`` drain on SIGTERM themselves; ``demo`` and ``bench`` call
        # unwind_on for the signals they handle.
        from gateway.model.processes import signal_exit, unwind_on

        unwind_on((signal.SIGTERM,), signal_exit)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        status = int(module.main(rest) or 0)
    except SystemExit as exc:
        if not _unwound():
            raise
        status = exc.code if isinstance(exc.code, int) else 1
    if _unwound():
        # A signal unwound through the command's ``finally`` blocks, which
        # stopped its child servers. Skip interpreter finalization: it waits on
        # library threads (TensorFlow's, gRPC's), and a CI run once saw an
        # evaluation still running 60 s after SIGTERM.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)
    return status


def _unwound() -> bool:
    """True once ``processes.unwind_on`` turned a signal into an exception (never imported: False)."""
    processes = sys.modules.get("gateway.model.processes")
    return processes is not None and processes.unwound_by() is not None


if __name__ == "__main__":
    sys.exit(main())
