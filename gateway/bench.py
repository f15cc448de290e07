"""``tfshield bench``: direct vs gateway vs nginx, measured on one machine in one run.

What runs
    One reference model server serving two upstream models from one base dir:
    ``echo`` (input ``x`` float32 [batch, 16] -> ``y``; near-zero model cost, so
    the proxy's cost dominates) and the demo ``mnist`` CNN (input ``images``
    float32 [batch, 28, 28, 1]). In front of it, as separate processes: the
    tfshield gateway (``tfshield serve``) and, when ``nginx`` is installed, an
    nginx ``grpc_pass`` proxy (one worker, upstream keepalive) as a reference
    point for "what a plain C proxy costs", and ``aio-floor``
    (:mod:`gateway.floor`, unless ``--no-floor``): a bare grpc.aio proxy that
    only forwards bytes, metadata, deadline and status, on the gateway's event
    loop, as the reference point for "what any Python grpc.aio proxy costs".
    The gateway's rows carry ``added_p50_vs_floor_ms`` (its p50 minus the
    floor's in the same cell): tfshield's own work on the pass-through path.
    Every cell is (model, batch 1|32, concurrency 1|16) x target (direct |
    aio-floor | gateway | nginx).

The load generator
    A separate process (``python -m gateway.bench``, driven over a pipe) that
    imports only grpc: one grpc.aio channel per target, kept for the whole run
    (as a real client would), N concurrent tasks each looping
    ``await call(request)``, where the request is the official
    ``tensorflow_serving.apis.predict_pb2.PredictRequest`` serialised once and
    the call has no (de)serialisers, so the client's per-call cost is small and
    identical for every target. Latency is ``time.perf_counter()`` around each
    call; throughput is completed calls / wall time of the slice. Failed calls
    are counted and excluded from latency.

Fairness and drift
    The client, the gateway, nginx and the model server share the machine's
    cores, so the client's own CPU is not free: it is measured (CPU time per
    process per slice, from ``/proc`` via psutil) and reported next to each row
    along with the proxy's CPU microseconds per request. The machine may be
    shared with other work: the CPU of every process this run did not start
    ("other CPU", % of one core: the machine's busy time from /proc/stat minus
    our processes' CPU time; approximate, since the two are accounted
    differently, and clamped at 0) is measured per row, and a note is printed
    when it exceeds 10 %. To reduce drift (thermal, page cache, background
    work), each cell's duration is split into ``--rounds`` slices and the
    targets alternate: round r runs the targets in an order rotated by r
    (direct, gateway, nginx / gateway, nginx, direct / ...), after one
    unrecorded warm-up slice per target. Before every slice the driver waits
    (at most 3 s) until this run's processes are quiet (< 5 % of a core over
    0.1 s), so that work a heavy target left queued (monitor state writes, the
    model server finishing feature squeezing's variants) does not run on into
    the next target's slice; the JSON keeps each slice's wait (``settle_s``)
    and the CPU the proxies not being measured used meanwhile
    (``idle_targets_cpu_pct``, a note when over 10 %). When a row the latency
    targets compare (direct, aio-floor, gateway, gateway+valid+maha at
    concurrency 1) has round p50s more than 0.2 ms apart, a note says the run
    was unsteady: the machine changed state by as much as the targets'
    margins, and a PASS or MISS near its line means little (on such a host,
    more and shorter rounds, e.g. ``--duration-s 10 --rounds 40``, average the
    drift out better than the default three). A row pools its rounds'
    latencies for p50/p99 and sums their calls and wall time for requests/s;
    the JSON keeps each round's requests/s so drift is visible. "Added p50" and
    "throughput ratio" compare with the direct row of the same cell, measured
    in the same run.

The gateway's footprint
    Start-up: process spawn -> ready file written (the ready file is polled
    every 2 ms), and spawn -> first successful Predict through it (which
    includes the gateway's first upstream connection); the gateway is started
    ``--startup-runs`` times and the median is judged. Idle RSS: psutil on the
    gateway's pid after start-up, a warm-up through every request kind and a
    short pause. TensorFlow: ``/proc/PID/maps`` of the gateway is searched for
    any mapped file with ``tensorflow`` in its path (the shared libraries the
    runtime loads); by design (DESIGN.md, decision 1) there must be none.

Detectors (``--detectors``, on by default when ``mnist`` is benchmarked)
    The demo model's detectors are calibrated once and cached beside the demo
    model (:mod:`gateway.bench_detectors` says how and where), and two more
    gateways join the mnist cells, each with its own ``--config``:
    ``gateway+valid+maha`` (validation and Mahalanobis: the configuration the
    0.3 ms target is about) and ``gateway+all`` (validation, Mahalanobis,
    feature squeezing, autoencoder; every action ``record``, so nothing is
    refused). They run in the same alternating rounds as direct and the plain
    gateway, so besides "added p50" (vs direct) their rows carry the
    detectors' own added p50 (``added_p50_vs_gateway_ms``: their p50 minus the
    plain gateway's p50 of the same cell) and ``throughput_ratio_vs_gateway``.
    The mnist requests carry real held-out demo digits (benign, as in
    production: a flag only costs a counter). A micro table gives each
    detector's in-process cost in microseconds per sample at batch 1 and 64
    (``timeit``, best of N, in a child process with the gateway's thread
    settings). The echo cells have no detector rows (nothing protects echo).

Monitors (``--monitors``, on by default when ``detectors.monitor_bench`` imports)
    Its ``benchmark_monitors(...)`` result is printed in a "monitors" section
    and stored under ``monitors`` in the JSON; Redis rows only when
    ``redis-server`` is on PATH (started on a unix socket in the temporary
    folder, stopped by its pid). See :mod:`gateway.bench_detectors`.

Targets (printed as PASS/MISS next to the measured values)
    added p50 at concurrency 1 <= 0.6 ms (every model and batch); gateway
    throughput at concurrency 16 on the trivial upstream >= 0.5 x direct; idle
    RSS <= 80 MB; start-up (spawn -> first successful response) <= 1 s; with
    detectors, the validation and Mahalanobis detectors together add <= 0.3 ms
    p50 at concurrency 1 (``gateway+valid+maha`` p50 minus ``gateway`` p50,
    every batch). That last one is a difference of two medians measured on a
    shared machine: read it next to the micro table and the 'other CPU'
    column, and rerun when they disagree.

Bounds
    Loopback only. Every process this command starts (model server, gateways,
    nginx, load generator) is stopped by its pid, SIGTERM then SIGKILL, also on
    error, Ctrl-C or SIGTERM. The nginx port is chosen by binding a socket to
    port 0 and closing it (nginx cannot report its port), which leaves a small
    race; a failed bind is retried with a new port. Slices are bounded in time
    (``--requests`` slices are capped at ``MAX_SLICE_S``) and calls have a
    deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.model.processes import signal_exit, stop_process, unwind_on

REPO = Path(__file__).resolve().parent.parent
PREDICT = "/tensorflow.serving.PredictionService/Predict"
TARGET_NAMES = (
    "direct",
    "aio-floor",
    "gateway",
    "gateway+valid+maha",
    "gateway+all",
    "gateway+monitors",
    "gateway+monitors+redis",
    "nginx",
)
# Gateways with detection configured for DETECTOR_MODEL, by target name: the detectors each runs.
DETECTOR_TARGETS = {
    "gateway+valid+maha": ("validation", "mahalanobis"),
    "gateway+all": ("validation", "mahalanobis", "feature_squeezing", "autoencoder"),
}
DETECTOR_MODEL = "mnist"
# Gateways with the default monitors on DETECTOR_MODEL, by target name: their state store
# (the policy's ladder in shadow mode, so the monitors' cost is measured, not their decisions).
MONITOR_TARGETS = {"gateway+monitors": "memory", "gateway+monitors+redis": "redis"}
BATCHES = (1, 32)
CONCURRENCIES = (1, 16)
ECHO_WIDTH = 16  # floats per echo row
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CALL_TIMEOUT_S = 10.0
MAX_SLICE_S = 60.0  # cap on one slice when --requests is used
READY_POLL_S = 0.002
MODEL_INPUTS = {"echo": "x", "mnist": "images"}
MODEL_OUTPUTS = {"echo": ("y",), "mnist": ("probabilities", "logits")}

# The targets, as (name, limit, unit); see the module docstring.
ADDED_P50_LIMIT_MS = 0.6
THROUGHPUT_RATIO_LIMIT = 0.5
IDLE_RSS_LIMIT_MB = 80.0
STARTUP_LIMIT_S = 1.0
DETECTORS_ADDED_P50_LIMIT_MS = 0.3  # gateway+valid+maha p50 - gateway p50, concurrency 1
BACKGROUND_WARN_PCT = 10.0  # CPU of other processes, % of one core, above which results carry a note
# Before each slice, wait (at most SETTLE_MAX_S) until this run's processes together use less than
# SETTLE_QUIET_PCT of a core over SETTLE_WINDOW_S: work a target queued (monitor writes, a model
# server still computing a heavy target's variants) must not run on in the next target's slice.
SETTLE_QUIET_PCT = 5.0
SETTLE_WINDOW_S = 0.1
SETTLE_MAX_S = 3.0
# A row at concurrency 1 whose rounds' p50s differ by more than this carries a note: the
# machine changed state during the cell by as much as the differences the targets judge.
ROUND_SPREAD_WARN_MS = 0.2
JUDGED_LATENCY_TARGETS = ("direct", "aio-floor", "gateway", "gateway+valid+maha")  # in the p50 targets


class BenchError(Exception):
    """The benchmark could not run; the message says what to fix."""


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    spawn_to_ready_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def address(self) -> str:
        return f"127.0.0.1:{int(self.info['grpc_port'])}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }


def start_with_ready_file(
    name: str,
    argv: list[str],
    workdir: Path,
    timeout_s: float,
    stack: contextlib.ExitStack,
    env: dict[str, str] | None = None,
) -> Started:
    """Spawn ``argv --ready-file F`` and wait for F; the process is stopped when ``stack`` closes."""
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        spawned = time.perf_counter()
        popen = subprocess.Popen(
            [*argv, "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env={**_child_env(), **(env or {})},
        )
    stack.callback(stop_process, popen)
    proc = Started(name, popen, log_path)
    deadline = spawned + timeout_s
    while not ready.exists():
        if popen.poll() is not None:
            raise BenchError(f"{name} exited with {popen.returncode} before it was ready:\n{proc.log_tail()}")
        if time.perf_counter() > deadline:
            raise BenchError(f"{name} was not ready after {timeout_s:.0f} s:\n{proc.log_tail()}")
        time.sleep(READY_POLL_S)
    proc.spawn_to_ready_s = time.perf_counter() - spawned
    proc.info = json.loads(ready.read_text())
    return proc


def tfshield_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, close): only for nginx, which cannot report one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------


def nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    if match is None:
        raise BenchError(f"cannot read the version of {binary}: {out.stderr.strip()}")
    return tuple(int(part) for part in match.groups())


def nginx_conf(tmp: Path, port: int, upstream_port: int, version: tuple[int, ...]) -> str:
    """A minimal gRPC reverse proxy: one worker, upstream keepalive, nothing logged per request."""
    # `http2 on;` replaced `listen ... http2` in 1.25.1; older versions reject it.
    new_http2 = version >= (1, 25, 1)
    listen = f"listen 127.0.0.1:{port}" + (";\n        http2 on;" if new_http2 else " http2;")
    # As root, nginx would switch its worker to `nobody`, which cannot enter the private temp dir.
    user = ""
    if os.geteuid() == 0:
        import pwd

        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};"
    return f"""{user}
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 0;
    client_body_buffer_size 4m;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    upstream model_server {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        {listen}
        location / {{
            grpc_pass grpc://model_server;
            grpc_read_timeout 60s;
            grpc_send_timeout 60s;
        }}
    }}
}}
"""


def start_nginx(binary: str, upstream_port: int, workdir: Path, stack: contextlib.ExitStack) -> Started:
    version = nginx_version(binary)
    tmp = workdir / "nginx"
    tmp.mkdir(exist_ok=True)
    last_error = ""
    for _attempt in range(3):
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, port, upstream_port, version))
        log_path = tmp / "stderr.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [binary, "-c", str(conf), "-p", str(tmp)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        stack.callback(stop_process, popen)
        proc = Started("nginx", popen, log_path, {"grpc_port": port, "version": ".".join(map(str, version))})
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and popen.poll() is None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            time.sleep(0.02)
        errors = (tmp / "error.log").read_text(errors="replace") if (tmp / "error.log").exists() else ""
        last_error = proc.log_tail() + errors
        stop_process(popen)
        if "Address already in use" not in last_error:
            break
    raise BenchError(f"nginx did not start:\n{last_error}")


# ---------------------------------------------------------------------------
# Models and requests
# ---------------------------------------------------------------------------


def prepare_models(models: list[str], base: Path, cache_dir: Path) -> None:
    """Put every requested model under ``base`` (one model server serves them all)."""
    base.mkdir(parents=True, exist_ok=True)
    if "echo" in models:
        from gateway.model.testmodels import build_test_models_cached

        shutil.copytree(build_test_models_cached(cache_dir) / "echo", base / "echo")
    if "mnist" in models:
        from gateway.model.demo import train_demo_model

        demo_base = Path(train_demo_model(cache_dir))
        source = demo_base / "mnist"
        if not source.is_dir():
            raise BenchError(f"train_demo_model returned {demo_base}, which has no mnist/ model")
        shutil.copytree(source, base / "mnist", symlinks=False)


def demo_digits(cache_dir: Path, count: int) -> Any:
    """``count`` held-out demo test digits, float32 (count, 28, 28, 1): benign mnist requests."""
    import numpy as np

    from gateway.model.demo import DemoArtifacts

    x_test, _ = DemoArtifacts.at(cache_dir).load_test_split()
    heldout = x_test[len(x_test) // 2 :]  # the half calibration never saw (calibrate.demo_reference)
    return np.ascontiguousarray(heldout[:count], dtype=np.float32)


def build_request(model: str, batch: int, seed: int = 0, values: Any = None) -> bytes:
    """An official PredictRequest for ``model`` with ``batch`` rows, serialised once.

    ``values`` (float32, batch axis first) are sent as given; without them the rows are seeded noise.
    """
    import numpy as np
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    shape = (batch, ECHO_WIDTH) if model == "echo" else (batch, 28, 28, 1)
    if values is None:
        values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    elif tuple(values.shape) != shape:
        raise BenchError(
            f"request values for {model} have shape {list(values.shape)}, expected {list(shape)}"
        )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shape]
        ),
        tensor_content=values.astype("<f4").tobytes(),
    )
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    request.inputs[MODEL_INPUTS[model]].CopyFrom(tensor)
    return request.SerializeToString()


def cell_targets(model: str, targets: list[str]) -> list[str]:
    """The targets measured for ``model``: the detector and monitor gateways protect DETECTOR_MODEL only."""
    guarded = {*DETECTOR_TARGETS, *MONITOR_TARGETS}
    return [t for t in targets if t not in guarded or model == DETECTOR_MODEL]


def check_responses(
    addresses: dict[str, str], requests: dict[str, bytes], differences: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One call per target and request: outputs present, and every proxy's answer equals direct's.

    A gateway running feature squeezing sends the client's rows in one batch
    with their squeezed variants, and the model's float arithmetic may depend
    on the batch size (oneDNN picks kernels by shape): its answer must equal
    direct's up to float32 round-off (``np.allclose``, rtol and atol 1e-5);
    the largest difference goes into ``differences[key][target]``.
    """
    import grpc
    from tensorflow_serving.apis import predict_pb2

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    checks: dict[str, Any] = {}
    for key, raw in requests.items():
        model = key.split("/")[0]
        answers = {}
        for target in cell_targets(model, list(addresses)):
            address = addresses[target]
            with grpc.insecure_channel(address, options=options) as channel:
                call = channel.unary_unary(PREDICT)
                answer = predict_pb2.PredictResponse.FromString(call(raw, timeout=CALL_TIMEOUT_S))
            missing = set(MODEL_OUTPUTS[model]) - set(answer.outputs)
            if missing:
                raise BenchError(f"{target} answered {key} without outputs {sorted(missing)}")
            answers[target] = answer
        checks[key] = {target: answers[target] == answers["direct"] for target in answers}
        for target in answers:
            if not checks[key][target] and "feature_squeezing" in DETECTOR_TARGETS.get(target, ()):
                close, largest = _close_answers(answers[target], answers["direct"])
                checks[key][target] = close
                if differences is not None:
                    differences.setdefault(key, {})[target] = largest
        bad = [target for target, same in checks[key].items() if not same]
        if bad:
            raise BenchError(f"{', '.join(bad)} answered {key} differently from the model server")
    return checks


def _close_answers(answer: Any, expected: Any) -> tuple[bool, float]:
    """Same outputs, dtypes and shapes, and values within float32 round-off; the largest difference."""
    import numpy as np
    import tensorflow as tf

    if set(answer.outputs) != set(expected.outputs) or answer.model_spec != expected.model_spec:
        return False, float("inf")
    largest = 0.0
    for name, tensor in expected.outputs.items():
        mine = answer.outputs[name]
        if mine.dtype != tensor.dtype or mine.tensor_shape != tensor.tensor_shape:
            return False, float("inf")
        a, b = tf.make_ndarray(mine), tf.make_ndarray(tensor)
        if a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                return False, float("inf")
            continue
        largest = max(largest, float(np.abs(a - b).max(initial=0.0)))
        if not np.allclose(a, b, rtol=1e-5, atol=1e-5):
            return False, largest
    return True, largest


# ---------------------------------------------------------------------------
# The load generator (its own process; imports only grpc)
# ---------------------------------------------------------------------------


class _LoadGenerator:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.channels: dict[str, Any] = {}
        self.calls: dict[str, Any] = {}
        self.requests: dict[str, bytes] = {}

    async def _connect(self, targets: dict[str, str]) -> None:
        import grpc

        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
        ]
        for name, address in targets.items():
            channel = grpc.aio.insecure_channel(address, options=options)
            await asyncio.wait_for(channel.channel_ready(), 10.0)
            self.channels[name] = channel
            self.calls[name] = channel.unary_unary(PREDICT)

    async def _run(
        self, target: str, request: str, concurrency: int, duration_s: float, max_requests: int | None
    ) -> dict[str, Any]:
        import grpc

        call = self.calls[target]
        raw = self.requests[request]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        budget = [max_requests if max_requests is not None else -1]
        stop_at = time.perf_counter() + (duration_s if max_requests is None else MAX_SLICE_S)
        perf = time.perf_counter

        async def worker() -> None:
            while perf() < stop_at:
                if budget[0] == 0:
                    return
                budget[0] -= 1
                started = perf()
                try:
                    await call(raw, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                latencies.append(perf() - started)

        cpu0 = time.process_time()
        started = perf()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = perf() - started
        return {
            "elapsed_s": elapsed,
            "client_cpu_s": time.process_time() - cpu0,
            "errors": errors,
            "latencies_us": [round(x * 1e6, 1) for x in latencies],
        }

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "connect":
            self.loop.run_until_complete(self._connect(command["targets"]))
            return {"ok": True}
        if op == "load":
            self.requests[command["name"]] = Path(command["path"]).read_bytes()
            return {"ok": True}
        if op == "run":
            result = self.loop.run_until_complete(
                self._run(
                    command["target"], command["request"], int(command["concurrency"]),
                    float(command["duration_s"]), command.get("max_requests"),
                )
            )
            return {"ok": True, **result}
        if op == "close":
            for channel in self.channels.values():
                self.loop.run_until_complete(channel.close())
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


def client_main() -> int:
    """The load generator: JSON commands on stdin, one JSON answer per line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the protocol stream
    generator = _LoadGenerator()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = generator.handle(json.loads(line))
        except Exception as exc:  # report, keep serving; the driver decides
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        if json.loads(line).get("op") == "close":
            break
    return 0


class ClientProcess:
    """The driver's handle on the load-generator process."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.log_path = workdir / "client.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "gateway.bench"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=_child_env(), cwd=REPO,
            )
        stack.callback(stop_process, self.popen)
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def ask(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write((json.dumps(command) + "\n").encode())
        self.popen.stdin.flush()
        deadline = time.monotonic() + timeout_s
        fd = self.popen.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load generator did not answer {command['op']} within {timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BenchError(f"load generator exited:\n{self.log_path.read_text(errors='replace')}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise BenchError(f"load generator failed on {command['op']}: {answer.get('error')}")
        return answer


# ---------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def settle(pids: list[int]) -> float:
    """Wait until ``pids`` together use < SETTLE_QUIET_PCT of a core over SETTLE_WINDOW_S, at most
    SETTLE_MAX_S; returns the seconds waited."""
    started = time.perf_counter()
    before = cpu_seconds(pids)
    while True:
        time.sleep(SETTLE_WINDOW_S)
        after = cpu_seconds(pids)
        quiet = 100.0 * (after - before) / SETTLE_WINDOW_S < SETTLE_QUIET_PCT
        if quiet or time.perf_counter() - started >= SETTLE_MAX_S:
            return time.perf_counter() - started
        before = after


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent not idle, over all cores."""
    import psutil

    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def rss_mb(pid: int) -> dict[str, float]:
    import psutil

    process = psutil.Process(pid)
    info = process.memory_full_info()
    return {"rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20}


def tensorflow_mappings(pid: int) -> list[str]:
    """Files mapped into ``pid`` whose path mentions tensorflow (none for a gateway, by design)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "tensorflow" in parts[5]:
                found.add(parts[5].strip())
    return sorted(found)


def nginx_worker_pids(master: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(master).children()]
    return []


def first_success_s(address: str, raw: bytes, spawned_at: float, timeout_s: float = 10.0) -> float:
    """Seconds from ``spawned_at`` until a Predict through ``address`` succeeds."""
    import grpc

    deadline = time.perf_counter() + timeout_s
    last: Exception | None = None
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT)
        while time.perf_counter() < deadline:
            try:
                call(raw, timeout=max(0.1, deadline - time.perf_counter()), wait_for_ready=True)
                return time.perf_counter() - spawned_at
            except grpc.RpcError as exc:
                last = exc
                time.sleep(0.005)
    raise BenchError(f"no successful call through {address} within {timeout_s:.0f} s: {last}")


def percentiles_ms(latencies_us: list[float]) -> dict[str, float]:
    import numpy as np

    if not latencies_us:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    values = np.asarray(latencies_us) / 1000.0
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(values.mean())}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    models: list[str]
    duration_s: float
    requests: int | None
    rounds: int
    warmup_s: float
    startup_runs: int
    nginx: bool
    out: Path
    cache_dir: Path
    quick: bool
    gateway_env: dict[str, str] = field(default_factory=dict)
    detectors: bool = False
    monitors: bool = False
    floor: bool = True
    batches: tuple[int, ...] = BATCHES
    concurrencies: tuple[int, ...] = CONCURRENCIES


def _say(text: str) -> None:
    print(text, flush=True)


def _cells(settings: Settings) -> Iterator[tuple[str, int, int]]:
    for model in settings.models:
        for batch in settings.batches:
            for concurrency in settings.concurrencies:
                yield model, batch, concurrency


def _slice_timeout(settings: Settings, duration_s: float) -> float:
    return (MAX_SLICE_S if settings.requests is not None else duration_s) + CALL_TIMEOUT_S + 30.0


def measure_cells(
    settings: Settings,
    client: ClientProcess,
    targets: list[str],
    proxy_pids: dict[str, list[int]],
    server_pid: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # Everything this run started, and the driver itself: the rest of the machine's CPU is background.
    ours = sorted({os.getpid(), client.pid, server_pid, *(p for pids in proxy_pids.values() for p in pids)})
    settled_on = [p for p in ours if p != os.getpid()]  # the driver itself polls while it waits
    cells = list(_cells(settings))
    slice_s = settings.duration_s / settings.rounds
    slice_requests = None if settings.requests is None else max(1, settings.requests // settings.rounds)
    all_targets = targets
    for index, (model, batch, concurrency) in enumerate(cells, 1):
        request = f"{model}/b{batch}"
        targets = cell_targets(model, all_targets)
        for target in targets:  # unrecorded warm-up, also re-primes each connection
            client.ask(
                {"op": "run", "target": target, "request": request, "concurrency": concurrency,
                 "duration_s": settings.warmup_s, "max_requests": None},
                _slice_timeout(settings, settings.warmup_s),
            )
        pooled: dict[str, dict[str, Any]] = {
            t: {"latencies_us": [], "elapsed_s": 0.0, "errors": {}, "client_cpu_s": 0.0,
                "proxy_cpu_s": 0.0, "server_cpu_s": 0.0, "background_cpu_s": 0.0, "round_rps": [],
                "round_p50_ms": [], "idle_targets_cpu_s": 0.0, "settle_s": []}
            for t in targets
        }
        for round_ in range(settings.rounds):
            order = targets[round_ % len(targets):] + targets[: round_ % len(targets)]
            for target in order:
                pids = proxy_pids.get(target, [])
                # The other proxies, which should sit idle while this target is measured.
                idle_targets = [p for p in settled_on if p not in (*pids, server_pid, client.pid)]
                pooled[target]["settle_s"].append(settle(settled_on))
                idle0 = cpu_seconds(idle_targets)
                proxy0, server0 = cpu_seconds(pids), cpu_seconds([server_pid])
                ours0, busy0 = cpu_seconds(ours), machine_busy_s()
                answer = client.ask(
                    {"op": "run", "target": target, "request": request, "concurrency": concurrency,
                     "duration_s": slice_s, "max_requests": slice_requests},
                    _slice_timeout(settings, slice_s),
                )
                acc = pooled[target]
                acc["background_cpu_s"] += max(0.0, machine_busy_s() - busy0 - (cpu_seconds(ours) - ours0))
                acc["proxy_cpu_s"] += cpu_seconds(pids) - proxy0
                acc["idle_targets_cpu_s"] += cpu_seconds(idle_targets) - idle0
                acc["server_cpu_s"] += cpu_seconds([server_pid]) - server0
                acc["latencies_us"] += answer["latencies_us"]
                acc["elapsed_s"] += answer["elapsed_s"]
                acc["client_cpu_s"] += answer["client_cpu_s"]
                for code, count in answer["errors"].items():
                    acc["errors"][code] = acc["errors"].get(code, 0) + count
                acc["round_rps"].append(len(answer["latencies_us"]) / answer["elapsed_s"])
                acc["round_p50_ms"].append(percentiles_ms(answer["latencies_us"])["p50_ms"])
        cell_rows = []
        for target in targets:
            acc = pooled[target]
            completed = len(acc["latencies_us"])
            row: dict[str, Any] = {
                "model": model, "batch": batch, "concurrency": concurrency, "target": target,
                "requests": completed, "errors": acc["errors"], "elapsed_s": acc["elapsed_s"],
                "rps": completed / acc["elapsed_s"] if acc["elapsed_s"] else 0.0,
                **percentiles_ms(acc["latencies_us"]),
                "round_rps": acc["round_rps"],
                "round_p50_ms": acc["round_p50_ms"],
                "client_cpu_pct": 100.0 * acc["client_cpu_s"] / acc["elapsed_s"] if acc["elapsed_s"] else 0.0,
                "background_cpu_pct": (
                    100.0 * acc["background_cpu_s"] / acc["elapsed_s"] if acc["elapsed_s"] else 0.0
                ),
                # This run's other proxies, busy while they were not the target (should be ~0).
                "idle_targets_cpu_pct": (
                    100.0 * acc["idle_targets_cpu_s"] / acc["elapsed_s"] if acc["elapsed_s"] else 0.0
                ),
                "settle_s": acc["settle_s"],
                "server_cpu_us_per_request": 1e6 * acc["server_cpu_s"] / completed if completed else 0.0,
                "proxy_cpu_us_per_request": (
                    1e6 * acc["proxy_cpu_s"] / completed if completed and target != "direct" else None
                ),
            }
            cell_rows.append(row)
        direct = next(r for r in cell_rows if r["target"] == "direct")
        plain = next((r for r in cell_rows if r["target"] == "gateway"), None)
        floor = next((r for r in cell_rows if r["target"] == "aio-floor"), None)
        for row in cell_rows:
            row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
            row["throughput_ratio"] = row["rps"] / direct["rps"] if direct["rps"] else 0.0
            if row["target"] in DETECTOR_TARGETS and plain is not None:
                # The detectors' own cost: the plain gateway of the same cell is the baseline.
                row["detectors"] = list(DETECTOR_TARGETS[row["target"]])
            if (row["target"] in DETECTOR_TARGETS or row["target"] in MONITOR_TARGETS) and plain is not None:
                row["added_p50_vs_gateway_ms"] = row["p50_ms"] - plain["p50_ms"]
                row["throughput_ratio_vs_gateway"] = row["rps"] / plain["rps"] if plain["rps"] else 0.0
            if row["target"] == "gateway" and floor is not None:
                # tfshield's own work: the bare grpc.aio proxy of the same cell is the baseline.
                row["added_p50_vs_floor_ms"] = row["p50_ms"] - floor["p50_ms"]
            errors = sum(row["errors"].values())
            _say(
                f"[{index}/{len(cells)}] {model:<5} batch {batch:>2} conc {concurrency:>2} "
                f"{row['target']:<18} "
                f"{row['requests']:>6} calls {row['rps']:>8.0f} req/s  p50 {row['p50_ms']:6.3f} ms  "
                f"p99 {row['p99_ms']:6.3f} ms" + (f"  errors {errors}" if errors else "")
            )
        rows += cell_rows
    return rows


def measurement_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Notes on how far to trust the rows: an unsteady machine, proxies busy out of turn, slices
    started unsettled, other processes' CPU."""
    notes = []
    spreads = [
        (max(row["round_p50_ms"]) - min(row["round_p50_ms"]), row)
        for row in rows
        if row["concurrency"] == 1
        and row["target"] in JUDGED_LATENCY_TARGETS
        and len(row["round_p50_ms"]) > 1
    ]
    unsteady = [(spread, row) for spread, row in spreads if spread > ROUND_SPREAD_WARN_MS]
    if unsteady:
        worst, row = max(unsteady, key=lambda pair: pair[0])
        notes.append(
            f"{len(unsteady)} row(s) the latency targets compare (concurrency 1: "
            f"{', '.join(JUDGED_LATENCY_TARGETS)}) had round p50s more than "
            f"{ROUND_SPREAD_WARN_MS} ms apart (widest: {row['model']} batch {row['batch']} "
            f"{row['target']}, {worst:.2f} ms; "
            "round_p50_ms in the JSON): the machine changed state during the run by as much as the "
            "targets' margins, so rerun before reading a PASS or MISS near its line"
        )
    spill = max(row["idle_targets_cpu_pct"] for row in rows)
    if spill > BACKGROUND_WARN_PCT:
        notes.append(
            f"proxies that were not being measured used up to {spill:.0f}% of a core during a "
            "measurement (idle_targets_cpu_pct in the JSON): work left over from an earlier slice"
        )
    unsettled = sum(s >= SETTLE_MAX_S for row in rows for s in row["settle_s"])
    if unsettled:
        notes.append(
            f"{unsettled} slice(s) started after {SETTLE_MAX_S:.0f} s without this run's processes "
            f"going quiet (< {SETTLE_QUIET_PCT:.0f}% of a core)"
        )
    busiest = max(row["background_cpu_pct"] for row in rows)
    if busiest > BACKGROUND_WARN_PCT:
        notes.append(
            f"other processes used up to {busiest:.0f}% of a core during a measurement (column "
            "'other CPU'): the numbers are pessimistic and noisier; rerun on a quiet machine"
        )
    return notes


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets next to the measured values."""
    checks: list[dict[str, Any]] = []
    rows = results["rows"]
    for row in rows:
        if row["target"] == "gateway" and row["concurrency"] == 1:
            check = {
                "target": f"added p50, {row['model']} batch {row['batch']} conc 1",
                "measured": row["added_p50_ms"], "limit": ADDED_P50_LIMIT_MS, "op": "<=", "unit": "ms",
            }
            floor = _same_cell(rows, row, "aio-floor")
            if floor is not None:
                check["context"] = f"aio-floor {floor['added_p50_ms']:+.3f} ms"
            checks.append(check)
    for row in rows:
        if row["target"] == "gateway" and row["concurrency"] == 16 and row["model"] == "echo":
            checks.append({
                "target": f"throughput vs direct, echo batch {row['batch']} conc 16",
                "measured": row["throughput_ratio"], "limit": THROUGHPUT_RATIO_LIMIT, "op": ">=", "unit": "x",
            })
    for row in rows:
        if row["target"] != "gateway+valid+maha" or row["concurrency"] != 1:
            continue
        if "added_p50_vs_gateway_ms" in row:
            checks.append({
                "target": "detectors (validation+mahalanobis) added p50, "
                f"{row['model']} batch {row['batch']} conc 1",
                "measured": row["added_p50_vs_gateway_ms"], "limit": DETECTORS_ADDED_P50_LIMIT_MS,
                "op": "<=", "unit": "ms",
            })
    gateway = results["gateway"]
    checks.append({
        "target": "idle RSS", "measured": gateway["idle_rss_mb"], "limit": IDLE_RSS_LIMIT_MB,
        "op": "<=", "unit": "MB",
    })
    checks.append({
        "target": "start-up, spawn -> first response (median)",
        "measured": gateway["startup"]["spawn_to_first_response_s_median"], "limit": STARTUP_LIMIT_S,
        "op": "<=", "unit": "s",
    })
    for check in checks:
        measured, limit = check["measured"], check["limit"]
        check["pass"] = bool(measured <= limit if check["op"] == "<=" else measured >= limit)
    return checks


def _same_cell(rows: list[dict[str, Any]], row: dict[str, Any], target: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["target"] == target
         and (r["model"], r["batch"], r["concurrency"]) == (row["model"], row["batch"], row["concurrency"])),
        None,
    )


def format_floor(results: dict[str, Any]) -> list[str]:
    """What the runtime costs and what tfshield adds to it, per cell."""
    rows = [r for r in results["rows"] if r["target"] == "gateway" and "added_p50_vs_floor_ms" in r]
    if not rows:
        return []
    lines = [
        "",
        "the grpc.aio floor (aio-floor: a bare byte-forwarding grpc.aio proxy, gateway/floor.py), added p50 "
        "over direct:",
    ]
    for row in rows:
        floor = _same_cell(results["rows"], row, "aio-floor")
        assert floor is not None
        lines.append(
            f"  {row['model']:<5} batch {row['batch']:>2} conc {row['concurrency']:>2}: aio-floor "
            f"{floor['added_p50_ms']:+.3f} ms, gateway {row['added_p50_ms']:+.3f} ms, "
            f"gateway over the floor {row['added_p50_vs_floor_ms']:+.3f} ms"
        )
    floor_io = results["host"].get("floor_grpc_experiments")
    gateway_io = results.get("gateway", {}).get("grpc_experiments")
    if floor_io is not None and gateway_io is not None and floor_io != gateway_io:
        lines.append(
            f"  NOTE: the floor ran with GRPC_EXPERIMENTS={floor_io!r}, the gateway with {gateway_io!r}: "
            "their difference is not tfshield's alone"
        )
    return lines


def format_report(results: dict[str, Any]) -> str:
    lines = []
    width = max(8, *(len(row["target"]) + 1 for row in results["rows"]))
    detector_rows = any("added_p50_vs_gateway_ms" in row for row in results["rows"])
    gw_column = f"{'+p50 gw':>9}" if detector_rows else ""
    lead = (
        f"{'model':<6}{'batch':>6}{'conc':>5}  {'target':<{width}}{'calls':>8}{'req/s':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'+p50 ms':>9}{gw_column}{'x direct':>9}"
    )
    header = lead + f"{'proxy CPU':>11}{'server CPU':>11}{'client CPU':>11}{'other CPU':>10}"
    units = f"{'':<{len(lead)}}{'us/call':>11}{'us/call':>11}{'% core':>11}{'% core':>10}"
    lines += [header, units, "-" * len(header)]
    previous = None
    for row in results["rows"]:
        cell = (row["model"], row["batch"], row["concurrency"])
        if previous is not None and cell != previous:
            lines.append("")
        previous = cell
        direct = row["target"] == "direct"
        proxy_cpu = row["proxy_cpu_us_per_request"]
        vs_gateway = row.get("added_p50_vs_gateway_ms")
        lines.append(
            f"{row['model']:<6}{row['batch']:>6}{row['concurrency']:>5}  {row['target']:<{width}}"
            f"{row['requests']:>8}{row['rps']:>9.0f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
            f"{'-' if direct else format(row['added_p50_ms'], '+.3f'):>9}"
            + (f"{'-' if vs_gateway is None else format(vs_gateway, '+.3f'):>9}" if detector_rows else "")
            + f"{'-' if direct else format(row['throughput_ratio'], '.2f'):>9}"
            f"{'-' if proxy_cpu is None else format(proxy_cpu, '.0f'):>11}"
            f"{row['server_cpu_us_per_request']:>11.0f}{row['client_cpu_pct']:>11.0f}"
            f"{row['background_cpu_pct']:>10.0f}"
        )
    if detector_rows:
        lines.append(
            "(+p50 gw: p50 minus the plain gateway's p50 of the same cell, i.e. the detectors' own cost)"
        )
    gateway = results["gateway"]
    startup = gateway["startup"]
    lines += [
        "",
        "gateway process:",
        f"  start-up, spawn -> ready file:     median {startup['spawn_to_ready_s_median'] * 1000:7.1f} ms  "
        f"(runs: {', '.join(f'{x * 1000:.0f}' for x in startup['spawn_to_ready_s'])} ms)",
        "  start-up, spawn -> first response: median "
        f"{startup['spawn_to_first_response_s_median'] * 1000:7.1f} ms"
        f"  (runs: {', '.join(f'{x * 1000:.0f}' for x in startup['spawn_to_first_response_s'])} ms)",
        f"  RSS idle after warm-up: {gateway['idle_rss_mb']:.1f} MB (USS {gateway['idle_uss_mb']:.1f} MB); "
        f"after the run: {gateway['final_rss_mb']:.1f} MB",
        f"  event loop: {gateway.get('event_loop', 'asyncio')} (config event_loop; uvloop is the fast extra)",
        f"  GRPC_EXPERIMENTS: {gateway.get('grpc_experiments') or '(gRPC defaults)'}",
        "  TensorFlow loaded: "
        + ("NO (no tensorflow library mapped)" if not gateway["tensorflow_mapped"]
           else "YES: " + ", ".join(gateway["tensorflow_mapped"])),
    ]
    for name, info in results["others"].items():
        lines.append(f"  for comparison, {name}: RSS {info['rss_mb']:.1f} MB")
    lines += format_floor(results)
    lines += format_detectors(results)
    lines += format_monitors(results)
    lines += ["", "targets:"]
    target_width = max([44, *(len(check["target"]) for check in results["targets"])])
    for check in results["targets"]:
        lines.append(
            f"  {'PASS' if check['pass'] else 'MISS'}  {check['target']:<{target_width}} "
            f"{check['measured']:8.3f} {check['unit']:<2} "
            f"(target {check['op']} {check['limit']} {check['unit']})"
            + (f"  [{check['context']}]" if "context" in check else "")
        )
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_detectors(results: dict[str, Any]) -> list[str]:
    """The detectors section: calibration, the micro table, the gateway rows' summary, the target line."""
    from gateway import bench_detectors

    section = results.get("detectors")
    if not section or not section.get("enabled"):
        return []
    calibration = section["calibration"]
    fprs = ", ".join(f"{name} {fpr:.1%}" for name, fpr in calibration["heldout_fpr"].items())
    lines = [
        "",
        f"detectors ({DETECTOR_MODEL}; calibrated at target FPR {calibration['target_fpr']:.0%}, "
        f"held-out FPR: {fprs}; "
        + ("calibrated in this run" if section["calibrated_now"] else "cached")
        + f": {section['artefacts']}):",
        f"  per-detector cost in-process, timeit best of {section['micro_repeat']}, one BLAS thread "
        "(as tfshield serve):",
    ]
    lines += bench_detectors.format_micro(section["micro"])
    lines += ["", "  in the gateway (rows above; same alternating rounds, every detector 'record'):"]
    lead = f"  {'batch':>5}{'conc':>5}  {'target':<20}{'+p50 vs direct':>15}{'+p50 vs gateway':>16}"
    lead += f"{'x direct':>9}{'x gateway':>10}"
    lines += [lead + f"{'proxy CPU':>13}", f"{'':<{len(lead)}}{'+us/call':>13}"]
    for item in section["summary"]:
        cpu = item["proxy_cpu_us_vs_gateway"]
        lines.append(
            f"  {item['batch']:>5}{item['concurrency']:>5}  {item['target']:<20}"
            f"{item['added_p50_ms']:>+12.3f} ms{item['added_p50_vs_gateway_ms']:>+13.3f} ms"
            f"{item['throughput_ratio']:>9.2f}{item['throughput_ratio_vs_gateway']:>10.2f}"
            f"{'-' if cpu is None else format(cpu, '+.0f'):>13}"
        )
    for check in results["targets"]:
        if check["target"].startswith("detectors (validation+mahalanobis)"):
            batch = re.search(r"batch (\d+)", check["target"])
            where = "at c1" if batch is None or batch.group(1) == "1" else f"at c1, batch {batch.group(1)}"
            lines.append(
                f"  detectors (validation+mahalanobis) added p50 {where} \u2264 {check['limit']} ms: "
                f"{'PASS' if check['pass'] else 'MISS'} ({check['measured']:.3f} ms)"
            )
    for name, info in section["gateways"].items():
        lines.append(
            f"  {name}: detectors {', '.join(info['detectors'])}; RSS idle {info['idle_rss_mb']:.1f} MB, "
            f"after the run {info['final_rss_mb']:.1f} MB; "
            f"spawn -> ready {info['spawn_to_ready_s'] * 1000:.0f} ms"
        )
    return lines


def format_monitors(results: dict[str, Any]) -> list[str]:
    from gateway import bench_detectors

    section = results.get("monitors")
    if not section:
        return []
    if not section.get("enabled"):
        return ["", f"monitors: skipped ({section.get('reason', 'disabled')})"]
    module = bench_detectors.monitor_module()
    origin = "calibrated in this run" if section["calibrated_now"] else "cached"
    lines = ["", f"monitors ({bench_detectors.MONITOR_MODULE}; suite {origin}: {section['suite']}):"]
    if module is None:
        return lines + ["  " + json.dumps(section["result"], default=str)]
    lines += bench_detectors.format_monitors(module, section["result"])
    return lines + _monitor_gateway_lines(results)


def _monitor_gateway_lines(results: dict[str, Any]) -> list[str]:
    """The gateways with every default monitor on, against direct and the plain gateway (rows above)."""
    rows = [r for r in results.get("rows", []) if r["target"] in MONITOR_TARGETS]
    if not rows:
        return []
    lines = [
        "",
        "  in the gateway (rows above; every default monitor, the policy's ladder in shadow mode):",
        f"  {'batch':>5} {'conc':>4}  {'target':<24} {'x direct':>8} {'x gateway':>9} "
        f"{'+p50 vs gateway':>16}",
    ]
    for r in rows:
        lines.append(
            f"  {r['batch']:>5} {r['concurrency']:>4}  {r['target']:<24} {r['throughput_ratio']:>8.2f} "
            f"{r.get('throughput_ratio_vs_gateway', 0.0):>9.2f} "
            f"{r.get('added_p50_vs_gateway_ms', 0.0):>+13.3f} ms"
        )
    return lines


def start_monitor_gateways(
    settings: Settings, upstream: str, workdir: Path, stack: contextlib.ExitStack, notes: list[str]
) -> dict[str, Started]:
    """The MONITOR_TARGETS gateways (memory store; Redis when redis-server is installed), or none.

    Their suite is the monitor section's cached one (calibrated here first when missing). A failure
    is a note, not an error: the other rows stand.
    """
    from gateway import bench_detectors

    if not settings.monitors or DETECTOR_MODEL not in settings.models:
        return {}
    started: dict[str, Started] = {}
    try:
        _say("monitors: looking for a calibrated monitor suite in the cache ...")
        suite, _ = bench_detectors.calibrated_monitor_suite(settings.cache_dir, upstream, _say)
        stores: dict[str, str | None] = {"gateway+monitors": None}
        if shutil.which("redis-server") is None:
            notes.append("gateway+monitors+redis row skipped: redis-server is not on PATH")
        else:
            redis = bench_detectors.start_redis(workdir / "redis-gateway", stack)
            stores["gateway+monitors+redis"] = redis.url
        for target, redis_url in stores.items():
            _say(f"starting {target} ...")
            config = bench_detectors.monitor_gateway_config(upstream, suite, redis_url, workdir)
            started[target] = start_configured_gateway(target, config, workdir, stack, settings)
    except Exception as exc:  # say what failed, keep the other rows
        notes.append(
            f"the monitor gateways could not start ({type(exc).__name__}: {exc}); their rows are missing"
        )
    return started


# ---------------------------------------------------------------------------
# Detectors and monitors (see gateway/bench_detectors.py)
# ---------------------------------------------------------------------------

MICRO_REPEAT = 7  # timeit runs per micro-table entry (best is kept); --quick: 3
MICRO_MIN_RUN_S = 0.05  # each run's duration, at least; --quick: 0.01


def prepare_detectors(
    settings: Settings, base: Path, workdir: Path
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Calibrated artefacts (cached), the autoencoder beside the models in ``base``, the micro table.

    Returns the JSON section and, by detector target, the artefact folder its gateway loads.
    """
    from gateway import bench_detectors

    def start_server(model_base: Path, stack: contextlib.ExitStack) -> str:
        argv = tfshield_argv("model-server", "--model-base-path", str(model_base), "--port", "0")
        return start_with_ready_file("calibration-model-server", argv, workdir, 180.0, stack).address()

    _say("detectors: looking for calibrated artefacts in the cache ...")
    repeat, min_run_s = (3, 0.01) if settings.quick else (MICRO_REPEAT, MICRO_MIN_RUN_S)
    try:
        entry, calibrated_now = bench_detectors.calibrated_artefacts(settings.cache_dir, start_server, _say)
        _say(("detectors: calibrated into " if calibrated_now else "detectors: cached in ") + str(entry.root))
        for model in sorted(p for p in entry.models.iterdir() if p.is_dir()):
            shutil.copytree(model, base / model.name, symlinks=False)
        folders = {
            target: bench_detectors.write_subset(entry, names, workdir / "artefacts" / target)
            for target, names in DETECTOR_TARGETS.items()
        }
        batches = " and ".join(map(str, bench_detectors.MICRO_BATCHES))
        _say(f"detectors: timing each one in-process at batch {batches} ...")
        micro = bench_detectors.micro_table(entry.artefacts, settings.cache_dir, repeat, min_run_s, workdir)
    except bench_detectors.DetectorBenchError as exc:
        raise BenchError(str(exc)) from None
    section = {
        "enabled": True,
        "model": DETECTOR_MODEL,
        "artefacts": str(entry.root),
        "calibrated_now": calibrated_now,
        "calibration": entry.info(),
        "micro_repeat": repeat,
        "micro_min_run_s": min_run_s,
        "micro": micro,
        "gateways": {},
        "summary": [],
    }
    return section, folders


def start_detector_gateway(
    target: str,
    artefacts: Path,
    upstream: str,
    workdir: Path,
    stack: contextlib.ExitStack,
    settings: Settings,
) -> Started:
    """A gateway protecting DETECTOR_MODEL with the detectors in ``artefacts`` (all 'record')."""
    from gateway import bench_detectors

    config = bench_detectors.gateway_config(upstream, artefacts)
    return start_configured_gateway(target, config, workdir, stack, settings)


def start_configured_gateway(
    target: str, config: dict[str, Any], workdir: Path, stack: contextlib.ExitStack, settings: Settings
) -> Started:
    """``tfshield serve`` with ``config`` (written as JSON, which is YAML) on ephemeral ports."""
    path = workdir / f"{target}.yaml"
    path.write_text(json.dumps(config))
    argv = tfshield_argv(
        "serve", "--config", str(path), "--port", "0", "--metrics-port", "0", "--log-level", "WARNING"
    )
    return start_with_ready_file(target, argv, workdir, 30.0, stack, settings.gateway_env)


def detector_counts(metrics_port: int) -> dict[str, Any]:
    """Samples scored and flagged per detector, and micro-batches, from the gateway's /metrics.

    Shows that the detectors ran on the measured calls (validation raises on
    failure and is not counted there: it checks inline).
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    scored: dict[str, float] = {}
    flagged: dict[str, float] = {}
    batches = 0.0
    batched_samples = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tfshield_detector_score_count":
                scored[sample.labels["detector"]] = scored.get(sample.labels["detector"], 0) + sample.value
            elif sample.name == "tfshield_detector_flags_total":
                flagged[sample.labels["detector"]] = flagged.get(sample.labels["detector"], 0) + sample.value
            elif sample.name == "tfshield_batch_size_count":
                batches += sample.value
            elif sample.name == "tfshield_batch_size_sum":
                batched_samples += sample.value
    return {
        "samples_scored": {k: int(v) for k, v in scored.items()},
        "samples_flagged": {k: int(v) for k, v in flagged.items()},
        "micro_batches": int(batches),
        "mean_micro_batch_samples": batched_samples / batches if batches else 0.0,
    }


def detector_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The detector rows next to direct and the plain gateway of their cell."""
    by_cell = {(r["model"], r["batch"], r["concurrency"], r["target"]): r for r in rows}
    summary = []
    for row in rows:
        if "added_p50_vs_gateway_ms" not in row or row["target"] not in DETECTOR_TARGETS:
            continue
        plain = by_cell[(row["model"], row["batch"], row["concurrency"], "gateway")]
        cpu, plain_cpu = row["proxy_cpu_us_per_request"], plain["proxy_cpu_us_per_request"]
        summary.append({
            "model": row["model"], "batch": row["batch"], "concurrency": row["concurrency"],
            "target": row["target"], "detectors": row["detectors"],
            "added_p50_ms": row["added_p50_ms"], "added_p50_vs_gateway_ms": row["added_p50_vs_gateway_ms"],
            "throughput_ratio": row["throughput_ratio"],
            "throughput_ratio_vs_gateway": row["throughput_ratio_vs_gateway"],
            "proxy_cpu_us_vs_gateway": None if cpu is None or plain_cpu is None else cpu - plain_cpu,
        })  # fmt: skip
    return summary


def monitors_off_reason(settings: Settings) -> str:
    from gateway.bench_detectors import MONITOR_MODULE, monitor_module

    if monitor_module() is None:
        return f"{MONITOR_MODULE} does not import"
    if DETECTOR_MODEL not in settings.models:
        return f"{DETECTOR_MODEL} not benchmarked"
    return "--no-monitors"


def run_monitors(settings: Settings, workdir: Path, upstream: str, notes: list[str]) -> dict[str, Any]:
    """The monitors section: ``detectors.monitor_bench.benchmark_monitors`` on a cached suite.

    A failure here is reported (section and note), not raised: the rows measured before it stand.
    """
    from gateway import bench_detectors

    module = bench_detectors.monitor_module()
    if module is None:
        return {"enabled": False, "reason": monitors_off_reason(settings)}
    try:
        from detectors.monitor_calibration import MonitorSuite

        _say("monitors: looking for a calibrated monitor suite in the cache ...")
        suite, calibrated_now = bench_detectors.calibrated_monitor_suite(settings.cache_dir, upstream, _say)
        _say(("monitors: calibrated into " if calibrated_now else "monitors: cached in ") + str(suite))
        x, predicted = bench_detectors.monitor_inputs(settings.cache_dir, upstream)
        _say(f"monitors: benchmarking each on {len(x)} held-out digits ...")
        result = bench_detectors.run_monitor_bench(
            module, MonitorSuite.load(suite), x, predicted, workdir, settings.quick
        )
    except Exception as exc:  # the monitor module is another team's, and new: say what failed, keep the rows
        message = f"{type(exc).__name__}: {exc}"
        notes.append(f"the monitor benchmark failed ({message}); its section is empty")
        return {"enabled": False, "reason": f"failed: {message}"}
    return {"enabled": True, "suite": str(suite), "calibrated_now": calibrated_now, "result": result}


def run(settings: Settings) -> dict[str, Any]:
    import grpc

    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="tfshield-bench-"))
    keep_workdir = False
    results: dict[str, Any] = {
        "version": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "grpc": grpc.__version__, "load_average_at_start": list(os.getloadavg()),
        },
        "settings": {
            "models": settings.models, "duration_s": settings.duration_s, "requests": settings.requests,
            "rounds": settings.rounds, "warmup_s": settings.warmup_s, "startup_runs": settings.startup_runs,
            "batches": list(settings.batches), "concurrencies": list(settings.concurrencies),
            "quick": settings.quick, "gateway_env": settings.gateway_env,
            "detectors": settings.detectors, "monitors": settings.monitors,
        },
        "notes": notes,
    }
    if not settings.detectors:
        off = "--no-detectors" if DETECTOR_MODEL in settings.models else f"{DETECTOR_MODEL} not benchmarked"
        results["detectors"] = {"enabled": False, "reason": off}
    try:
        with contextlib.ExitStack() as stack:
            _say(f"preparing models {', '.join(settings.models)} ...")
            base = workdir / "models"
            prepare_models(settings.models, base, settings.cache_dir)
            requests = {
                f"{m}/b{b}": build_request(
                    m, b, values=demo_digits(settings.cache_dir, b) if m == "mnist" else None
                )
                for m in settings.models
                for b in settings.batches
            }
            detector_folders: dict[str, Path] = {}
            if settings.detectors:
                results["detectors"], detector_folders = prepare_detectors(settings, base, workdir)
            for key, raw in requests.items():
                (workdir / f"{key.replace('/', '_')}.pb").write_bytes(raw)

            _say("starting the model server ...")
            server = start_with_ready_file(
                "model-server",
                tfshield_argv("model-server", "--model-base-path", str(base), "--port", "0"),
                workdir, 180.0, stack,
            )
            addresses = {"direct": server.address()}
            first_key = next(iter(requests))
            first_success_s(server.address(), requests[first_key], time.perf_counter(), 60.0)

            _say(f"starting the gateway {settings.startup_runs} time(s) to time its start-up ...")
            gateway_argv = tfshield_argv(
                "serve", "--upstream", server.address(), "--port", "0", "--metrics-port", "0",
                "--log-level", "WARNING",
            )
            to_ready, to_first = [], []
            gateway = None
            for run_index in range(settings.startup_runs):
                with contextlib.ExitStack() as one:
                    spawned = time.perf_counter()
                    gateway = start_with_ready_file(
                        f"gateway-{run_index}", gateway_argv, workdir, 30.0, one, settings.gateway_env
                    )
                    to_first.append(first_success_s(gateway.address(), requests[first_key], spawned))
                    to_ready.append(gateway.spawn_to_ready_s)
                    if run_index == settings.startup_runs - 1:
                        stack.push(one.pop_all())  # keep the last one for the benchmark
            assert gateway is not None
            addresses["gateway"] = gateway.address()
            proxy_pids = {"gateway": [gateway.pid]}

            detector_gateways: dict[str, Started] = {}
            for target, folder in detector_folders.items():
                _say(f"starting {target} ({', '.join(DETECTOR_TARGETS[target])}) ...")
                detector_gateways[target] = start_detector_gateway(
                    target, folder, server.address(), workdir, stack, settings
                )
            monitor_gateways = start_monitor_gateways(settings, server.address(), workdir, stack, notes)
            for target, started in {**detector_gateways, **monitor_gateways}.items():
                probe = requests[f"{DETECTOR_MODEL}/b{settings.batches[0]}"]
                first_success_s(started.address(), probe, time.perf_counter())
                addresses[target] = started.address()
                proxy_pids[target] = [started.pid]

            nginx_binary = shutil.which("nginx") or next(
                (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
            )
            nginx = None
            if not settings.nginx:
                notes.append("nginx row skipped: --no-nginx")
            elif nginx_binary is None:
                notes.append("nginx row skipped: nginx is not installed (apt-get install -y nginx)")
            else:
                _say("starting nginx ...")
                nginx = start_nginx(nginx_binary, int(server.info["grpc_port"]), workdir, stack)
                first_success_s(nginx.address(), requests[first_key], time.perf_counter())
                addresses["nginx"] = nginx.address()
                proxy_pids["nginx"] = nginx_worker_pids(nginx.pid) or [nginx.pid]
                results["host"]["nginx"] = nginx.info["version"]
            if settings.floor:
                _say("starting the grpc.aio floor (a bare byte-forwarding proxy, gateway/floor.py) ...")
                floor = start_with_ready_file(
                    "aio-floor",
                    [sys.executable, "-m", "gateway.floor", "--upstream", server.address(), "--port", "0"],
                    workdir, 30.0, stack, settings.gateway_env,
                )
                first_success_s(floor.address(), requests[first_key], time.perf_counter())
                addresses["aio-floor"] = floor.address()
                proxy_pids["aio-floor"] = [floor.pid]
                results["host"]["floor_grpc_experiments"] = floor.info.get("grpc_experiments", "")
            else:
                notes.append("aio-floor row skipped: --no-floor")
            targets = [t for t in TARGET_NAMES if t in addresses]

            differences: dict[str, Any] = {}
            results["response_checks"] = check_responses(addresses, requests, differences)
            if differences:
                results["response_differences"] = differences
                largest = max(d for per_key in differences.values() for d in per_key.values())
                _say(
                    f"responses identical across {', '.join(targets)} (feature squeezing's batched call: "
                    f"equal up to float round-off, largest difference {largest:.2g})"
                )
            else:
                _say(f"responses identical across {', '.join(targets)}")

            client = ClientProcess(workdir, stack)
            client.ask({"op": "connect", "targets": addresses}, 30.0)
            for key in requests:
                path = workdir / f"{key.replace('/', '_')}.pb"
                client.ask({"op": "load", "name": key, "path": str(path)}, 10.0)

            # Warm the gateways through every request kind, then let them go idle before reading their RSS.
            for target in ["gateway", *detector_gateways]:
                for key in requests:
                    if target not in cell_targets(key.split("/")[0], [target]):
                        continue
                    client.ask(
                        {"op": "run", "target": target, "request": key, "concurrency": 16,
                         "duration_s": settings.warmup_s, "max_requests": None},
                        _slice_timeout(settings, settings.warmup_s),
                    )
            time.sleep(1.0)
            idle = rss_mb(gateway.pid)
            detector_idle = {target: rss_mb(started.pid) for target, started in detector_gateways.items()}
            tf_maps = tensorflow_mappings(gateway.pid)

            _say(
                f"measuring {len(list(_cells(settings)))} cells x {len(targets)} targets, "
                f"{settings.rounds} alternating round(s) of "
                + (f"{settings.duration_s / settings.rounds:.2f} s" if settings.requests is None
                   else f"{max(1, settings.requests // settings.rounds)} calls")
                + f" each, after a {settings.warmup_s:.2f} s warm-up per target"
            )
            results["rows"] = measure_cells(settings, client, targets, proxy_pids, server.pid)
            notes += measurement_notes(results["rows"])
            client.ask({"op": "close"}, 10.0)

            final = rss_mb(gateway.pid)
            results["gateway"] = {
                "pid": gateway.pid,
                "startup": {
                    "spawn_to_ready_s": to_ready,
                    "spawn_to_first_response_s": to_first,
                    "spawn_to_ready_s_median": statistics.median(to_ready),
                    "spawn_to_first_response_s_median": statistics.median(to_first),
                },
                "idle_rss_mb": idle["rss_mb"],
                "idle_uss_mb": idle["uss_mb"],
                "final_rss_mb": final["rss_mb"],
                "tensorflow_mapped": tf_maps,
                "tensorflow_loaded": bool(tf_maps),
                "event_loop": gateway.info.get("event_loop", "asyncio"),
                "grpc_experiments": gateway.info.get("grpc_experiments", ""),
            }
            results["others"] = {"model server": rss_mb(server.pid)}
            if detector_gateways:
                section = results["detectors"]
                for target, started in detector_gateways.items():
                    section["gateways"][target] = {
                        "detectors": list(DETECTOR_TARGETS[target]),
                        "artefacts": str(detector_folders[target]),
                        "pid": started.pid,
                        "spawn_to_ready_s": started.spawn_to_ready_s,
                        "idle_rss_mb": detector_idle[target]["rss_mb"],
                        "final_rss_mb": rss_mb(started.pid)["rss_mb"],
                        "scored": detector_counts(int(started.info["metrics_port"])),
                    }
                section["summary"] = detector_summary(results["rows"])
            if nginx is not None:
                for pid in proxy_pids["nginx"]:
                    results["others"][f"nginx worker {pid}"] = rss_mb(pid)
            results["targets"] = judge(results)
            # Last, while the model server still answers (for the monitors' calibration and inputs).
            if settings.monitors:
                results["monitors"] = run_monitors(settings, workdir, server.address(), notes)
            else:
                results["monitors"] = {"enabled": False, "reason": monitors_off_reason(settings)}
    except BenchError:
        keep_workdir = True
        _say(f"(process logs kept in {workdir})")
        raise
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="tfshield bench",
        description="Benchmark client -> model server directly, through the tfshield gateway and through "
        "nginx grpc_pass, on this machine, in one run. Prints a table, writes JSON.",
    )
    parser.add_argument("--models", default="echo,mnist", help="comma-separated: echo, mnist (default both)")
    parser.add_argument(
        "--duration-s", type=float, help="seconds of measurement per cell and target (default 3)"
    )
    parser.add_argument("--requests", type=int, help="calls per cell and target instead of a duration")
    parser.add_argument("--rounds", type=int, help="alternating rounds a cell is split into (default 3)")
    parser.add_argument("--warmup-s", type=float, help="unrecorded warm-up per cell and target (default 0.3)")
    parser.add_argument("--startup-runs", type=int, help="gateway starts timed (default 3)")
    parser.add_argument("--quick", action="store_true", help="a short run (for tests): 0.4 s cells, 1 round")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx row")
    parser.add_argument(
        "--no-floor", action="store_true",
        help="skip the aio-floor row (a bare grpc.aio byte-forwarding proxy: what the runtime costs)",
    )
    parser.add_argument(
        "--detectors", action=argparse.BooleanOptionalAction, default=None,
        help="add the detector rows on mnist: gateway+valid+maha, gateway+all and a per-detector micro "
        "table, with detectors calibrated once into --cache-dir (default: on when mnist is benchmarked)",
    )
    parser.add_argument(
        "--monitors", action=argparse.BooleanOptionalAction, default=None,
        help="add the monitors section from detectors.monitor_bench (default: on when that module imports "
        "and mnist is benchmarked)",
    )
    parser.add_argument("--out", default="bench-results/bench.json", help="JSON results file")
    parser.add_argument(
        "--gateway-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment for the gateway process, to compare settings (repeatable), "
        "e.g. GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("TFSHIELD_CACHE") or str(Path.home() / ".cache" / "tfshield"),
        help="where the demo and test models are built once and cached, as for `tfshield demo` "
        "(default $TFSHIELD_CACHE, else ~/.cache/tfshield)",
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_INPUTS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none)'}; known: {', '.join(MODEL_INPUTS)}")
    quick = args.quick
    detectors = args.detectors if args.detectors is not None else DETECTOR_MODEL in models
    if detectors and DETECTOR_MODEL not in models:
        parser.error(f"--detectors: the detector rows protect {DETECTOR_MODEL}; add it to --models")
    if args.monitors is None:
        from gateway.bench_detectors import monitor_module

        monitors = DETECTOR_MODEL in models and monitor_module() is not None
    else:
        monitors = args.monitors
    if monitors and DETECTOR_MODEL not in models:
        parser.error(f"--monitors: the monitors watch clients of {DETECTOR_MODEL}; add it to --models")
    gateway_env = {}
    for item in args.gateway_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--gateway-env: expected NAME=VALUE, got {item!r}")
        gateway_env[name] = value
    settings = Settings(
        models=models,
        duration_s=args.duration_s if args.duration_s is not None else (0.4 if quick else 3.0),
        requests=args.requests,
        rounds=args.rounds if args.rounds is not None else (1 if quick else 3),
        warmup_s=args.warmup_s if args.warmup_s is not None else (0.1 if quick else 0.3),
        startup_runs=args.startup_runs if args.startup_runs is not None else (1 if quick else 3),
        nginx=not args.no_nginx,
        floor=not args.no_floor,
        out=Path(args.out),
        cache_dir=Path(args.cache_dir),
        quick=quick,
        gateway_env=gateway_env,
        detectors=detectors,
        monitors=monitors,
    )
    if settings.duration_s <= 0 or settings.rounds < 1 or settings.warmup_s < 0 or settings.startup_runs < 1:
        parser.error("--duration-s must be > 0, --rounds and --startup-runs >= 1, --warmup-s >= 0")
    if settings.requests is not None and settings.requests < 1:
        parser.error("--requests must be >= 1")
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the driver imports TensorFlow (requests, calibrate)
    restore_handlers = unwind_on((signal.SIGTERM,), signal_exit)
    try:
        results = run(settings)
    except BenchError as exc:
        print(f"tfshield bench: {exc}", file=sys.stderr)
        return 1
    finally:
        restore_handlers()
    _say("")
    _say(format_report(results))
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(results, indent=2) + "\n")
    _say(f"\nJSON written to {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(client_main())
