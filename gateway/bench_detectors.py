"""Detector costs for ``tfshield bench``: calibrated artefacts, the micro table, the monitor hook.

Artefacts
    The demo model's detectors (validation, Mahalanobis, feature squeezing,
    autoencoder) are calibrated with the library :func:`calibrate` on the
    demo's own split (:func:`~gateway.model.calibrate.demo_reference`, target
    FPR 1 %, the autoencoder trained for its default 10 epochs) against a
    temporary model server serving the cached demo model, once. The result is
    cached beside the demo model, under
    ``<cache dir>/bench-detectors/<recipe>-<fingerprint of the demo model>/``
    (``artefacts/mnist/`` for the gateway, ``models/mnist_autoencoder/1/``
    for the model server), built in a temporary folder and renamed into place,
    so a half-written entry is never trusted and a retrained demo model gets
    new thresholds. Later runs reuse it: the first run pays about 15-20 s (a
    model server start, 8-12 s of autoencoder training on 2 shared cores, the
    other detectors in about 1 s), the others nothing.

The micro table
    Each detector's scoring cost in microseconds per sample at batch 1 and
    64, on held-out benign demo digits (float32, as the gateway decodes them),
    with the calibrated artefacts. It runs in a child process
    (``python -m gateway.bench_detectors``) with the thread settings
    ``tfshield serve`` uses (one BLAS thread) and without TensorFlow loaded,
    so numpy does what it does in the gateway. Each entry is ``timeit``'s
    best of ``repeat`` runs of as many calls as fill ``min_run_s``, divided by
    the calls and the batch size: the best run is the one least disturbed by
    other work on a shared machine. What is timed is what the gateway runs in
    its own process, never a model call:

    - ``validation``: ``InputValidator.check`` (dtype, per-sample shape,
      NaN/Inf, value range), the inline request-path check;
    - ``mahalanobis``: ``score`` (the micro-batched scorer's call);
    - ``feature_squeezing``: ``variants(x)`` (1-bit depth and 2x2 median) and
      ``score_outputs`` on the model's outputs for ``x`` and each variant
      (synthetic probability rows here; its cost does not depend on them);
      not the concatenation, the protobuf re-encoding, nor the model's cost
      of the extra rows, which the ``gateway+all`` rows include;
    - ``autoencoder``: ``score`` given the reconstruction (synthetic here),
      i.e. the error computation; not the call to the autoencoder model.

Monitors
    When ``detectors.monitor_bench`` imports, its
    ``benchmark_monitors(suite, x, predicted, redis_url=..., **options)`` runs
    on a monitor suite calibrated once for the demo model (every default
    monitor, :func:`~detectors.monitor_calibration.calibrate_monitors` on
    :func:`~detectors.monitor_calibration.benign_sequences` drawn from the
    demo's calibration digits, the model's classes from the bench's model
    server; cached beside the detectors, under
    ``<cache dir>/bench-monitors/<recipe>-<fingerprint>-<monitor names digest>/``), with ``x`` the
    held-out digits and ``predicted`` the served model's classes for them.
    ``redis_url`` is a ``unix://`` URL of a ``redis-server`` started here on a
    unix socket in the bench's temporary folder (no TCP port, no persistence)
    and stopped by its pid, when ``redis-server`` is on PATH; otherwise
    ``None`` and the Redis rows are left out. ``--quick`` passes smaller
    counts (:data:`QUICK_MONITOR_OPTIONS`). ``format_table(result)`` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import TfshieldError
from gateway.model.processes import RedisServer, stop_process
from gateway.model.processes import start_redis as start_redis_server

# v2: the Mahalanobis detector keeps 30 components by default (was 50).
RECIPE = "bench-detectors-v2"
MODEL = "mnist"
INPUT = "images"
OUTPUT = "probabilities"
TARGET_FPR = 0.01
# The detectors calibrated for the bench: those its gateway targets run (gateway/bench.py's
# DETECTOR_TARGETS), whatever `tfshield calibrate` defaults to, so a cache entry always holds these.
DETECTORS = ("validation", "mahalanobis", "feature_squeezing", "autoencoder")
AUTOENCODER_EPOCHS: int | None = None  # the library default (10): one-time cost, cached
MICRO_BATCHES = (1, 64)
CALIBRATION_TIMEOUT_S = 600.0
MONITOR_MODULE = "detectors.monitor_bench"
MONITOR_INPUTS = 500  # held-out digits the monitor benchmark draws its queries from
# benchmark_monitors' counts under --quick (its defaults otherwise).
QUICK_MONITOR_OPTIONS = {"queries": 100, "warmup": 100, "clients": 200, "index_queries": 100}

# What each detector's micro-table row times (see the module docstring).
TIMED = {
    "validation": "check(): dtype, shape, NaN/Inf, range",
    "mahalanobis": "score()",
    "feature_squeezing": "variants() + score_outputs(), no model call",
    "autoencoder": "score() given the reconstruction, no model call",
}

Log = Callable[[str], None]


class DetectorBenchError(Exception):
    """The detector part of the benchmark cannot run; the message says what to fix."""


# ---------------------------------------------------------------------------
# Calibrated artefacts, cached
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchArtefacts:
    """A calibrated cache entry: the artefact folder and the autoencoder's model folder."""

    root: Path

    @property
    def artefacts(self) -> Path:
        """What ``detection.models[].artefacts`` points at (manifest.json, one folder per detector)."""
        return self.root / "artefacts" / MODEL

    @property
    def models(self) -> Path:
        """Holds ``mnist_autoencoder/<version>/``: copy it into the model server's base path."""
        return self.root / "models"

    @property
    def info_json(self) -> Path:
        return self.root / "calibration.json"

    def is_complete(self) -> bool:
        return (self.artefacts / "manifest.json").is_file() and self.info_json.is_file()

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.info_json.read_text())
        return data

    def detector_names(self) -> list[str]:
        return list(json.loads((self.artefacts / "manifest.json").read_text())["detectors"])


def demo_fingerprint(cache_dir: Path) -> str:
    """A digest of the cached demo model's files: a retrained model gets its own cache entry."""
    from gateway.model.demo import DemoArtifacts

    export = DemoArtifacts.at(cache_dir).export_dir
    digest = hashlib.sha256()
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(export)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def calibrated_artefacts(
    cache_dir: Path,
    start_model_server: Callable[[Path, contextlib.ExitStack], str],
    log: Log,
) -> tuple[BenchArtefacts, bool]:
    """The cached calibration for the demo model, calibrating it first when missing.

    ``start_model_server(base, stack)`` starts a model server on ``base``
    (stopped when ``stack`` closes) and returns its address. Returns the entry
    and whether it was calibrated now.
    """
    from gateway.model.demo import DemoArtifacts

    demo = DemoArtifacts.at(cache_dir)
    if not demo.is_complete():
        raise DetectorBenchError(f"no trained demo model in {demo.root}; the bench trains it first")
    entry = BenchArtefacts(cache_dir / "bench-detectors" / f"{RECIPE}-{demo_fingerprint(cache_dir)}")
    if entry.is_complete():
        return entry, False
    if entry.root.exists():
        log(f"  discarding the incomplete detector cache {entry.root}")
        shutil.rmtree(entry.root)
    entry.root.parent.mkdir(parents=True, exist_ok=True)
    building = BenchArtefacts(entry.root.parent / f".{entry.root.name}.building-{os.getpid()}")
    shutil.rmtree(building.root, ignore_errors=True)
    try:
        _calibrate_into(building, demo, start_model_server, log)
        os.rename(building.root, entry.root)
    except OSError as exc:
        if not entry.is_complete():  # another bench finished first: fine; anything else is not
            raise DetectorBenchError(f"cannot write the detector cache {entry.root}: {exc}") from None
    finally:
        shutil.rmtree(building.root, ignore_errors=True)
    return entry, True


def _calibrate_into(
    entry: BenchArtefacts,
    demo: Any,
    start_model_server: Callable[[Path, contextlib.ExitStack], str],
    log: Log,
) -> None:
    from gateway.model.autoencoder import DEFAULT_EPOCHS
    from gateway.model.calibrate import CalibrationError, calibrate, demo_reference

    entry.models.mkdir(parents=True)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        address = start_model_server(demo.model_base_path, stack)
        try:
            result = calibrate(
                MODEL,
                demo_reference(demo.root.parent),
                address,
                entry.artefacts,
                target_fpr=TARGET_FPR,
                detectors=DETECTORS,
                input_name=INPUT,
                output_name=OUTPUT,
                autoencoder_model_base_path=entry.models,
                autoencoder_epochs=AUTOENCODER_EPOCHS,
                log=lambda line: log("  " + line),
            )
        except CalibrationError as exc:
            raise DetectorBenchError(f"calibrating the demo model's detectors failed: {exc}") from None
    info = {
        "recipe": RECIPE,
        "model": MODEL,
        "target_fpr": TARGET_FPR,
        "detectors": list(result.manifest.detectors),
        "heldout_fpr": dict(result.manifest.heldout_fpr),
        "thresholds": {name: float(d.threshold_) for name, d in result.detectors.items()},
        "split_sizes": dict(result.split_sizes),
        "autoencoder_epochs": DEFAULT_EPOCHS if AUTOENCODER_EPOCHS is None else AUTOENCODER_EPOCHS,
        "calibration_s": time.monotonic() - started,
        "timings_s": dict(result.timings_s),
    }
    entry.info_json.write_text(json.dumps(info, indent=2) + "\n")


def write_subset(entry: BenchArtefacts, names: tuple[str, ...], folder: Path) -> Path:
    """An artefact folder holding only ``names`` of the calibrated detectors (copied, not refitted)."""
    from detectors.base import Detector
    from detectors.manifest import load_artefacts, write_artefacts

    manifest, _ = load_artefacts(entry.artefacts)
    missing = [n for n in names if n not in manifest.detectors]
    if missing:
        raise DetectorBenchError(f"{entry.artefacts} has no detector {missing}; delete {entry.root}")
    subset = dataclasses.replace(
        manifest,
        detectors=names,
        heldout_fpr={n: f for n, f in manifest.heldout_fpr.items() if n in names},
    )
    return write_artefacts(folder, subset, {n: Detector.load(entry.artefacts / n) for n in names})


def gateway_config(upstream: str, artefacts: Path) -> dict[str, Any]:
    """A gateway config protecting the demo model with every detector in ``artefacts``, all recording."""
    from detectors.manifest import load_artefacts

    manifest, _ = load_artefacts(artefacts)
    return {
        "upstream": {"target": upstream},
        "detection": {
            "models": [
                {
                    "model": MODEL,
                    "artefacts": str(artefacts),
                    "actions": {name: "record" for name in manifest.detectors},
                }
            ]
        },
    }


def monitor_gateway_config(
    upstream: str, suite: Path, redis_url: str | None, workdir: Path
) -> dict[str, Any]:
    """A gateway config monitoring the demo model with a copy of ``suite`` whose rate limit no bench
    client reaches (the bench sends one client's calls as fast as it can), on the memory store or
    Redis at ``redis_url``, and the built-in policy with its ladder in shadow mode."""
    from gateway.model.eval_monitors import recording_policy_yaml

    copy = workdir / "bench-monitor-suite"
    if not copy.exists():
        shutil.copytree(suite, copy)
        limit = copy / "rate_limit" / "detector.json"
        if limit.is_file():
            meta = json.loads(limit.read_text())
            meta["params"].update({"rate_per_s": 1e9, "burst": 1e9})
            limit.write_text(json.dumps(meta, indent=2, sort_keys=True))
    policy = workdir / "bench-recording-policy.yaml"
    policy.write_text(recording_policy_yaml())
    store: dict[str, Any] = {"backend": "memory"}
    if redis_url is not None:
        store = {"backend": "redis", "url": redis_url}
    return {
        "upstream": {"target": upstream},
        "monitors": {"models": [{"model": MODEL, "suite": str(copy)}], "store": store},
        "policy": {"file": str(policy)},
    }


# ---------------------------------------------------------------------------
# The micro table
# ---------------------------------------------------------------------------


def micro_table(
    artefacts: Path, cache_dir: Path, repeat: int, min_run_s: float, workdir: Path, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """Per-detector µs per sample at :data:`MICRO_BATCHES`, measured in a child process (see above)."""
    out = workdir / "micro.json"
    argv = [
        sys.executable, "-m", "gateway.bench_detectors",
        "--artefacts", str(artefacts), "--cache-dir", str(cache_dir),
        "--repeat", str(repeat), "--min-run-s", str(min_run_s), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    child = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process(child, 5.0)
        raise DetectorBenchError(
            f"the detector micro-benchmark did not finish in {timeout_s:.0f} s"
        ) from None
    finally:
        stop_process(child, 5.0)
    if child.returncode != 0:
        raise DetectorBenchError(f"the detector micro-benchmark failed:\n{output.decode(errors='replace')}")
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


def _best_seconds_per_call(fn: Callable[[], object], repeat: int, min_run_s: float) -> float:
    import timeit

    timer = timeit.Timer(fn)
    number = 1
    while True:  # calls per run: enough to fill min_run_s
        elapsed = timer.timeit(number)
        if elapsed >= min_run_s:
            break
        number = max(number * 2, int(number * min_run_s / max(elapsed, 1e-9) * 1.2))
    return min(timer.repeat(repeat=repeat, number=number)) / number


def _timed_call(name: str, detector: Any, input_name: str, x: Any) -> Callable[[], object]:
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "validation":
        return lambda: detector.check(input_name, x)
    if name == "feature_squeezing":
        classes = int(getattr(detector, "n_classes_", 10))
        outputs = [
            rng.dirichlet(np.ones(classes), size=len(x)).astype(np.float32)
            for _ in range(1 + len(detector.squeezers))
        ]
        original, *variant_outputs = outputs

        def squeeze() -> object:
            detector.variants(x)
            return detector.score_outputs(original, variant_outputs)

        return squeeze
    if name == "autoencoder":
        reconstruction = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
        return lambda: detector.score(x, lambda _model, _batch: reconstruction)
    if detector.needs_predictor:
        raise DetectorBenchError(f"no scoring half known for detector '{name}' (it calls a model)")
    return lambda: detector.score(x)


def measure_micro(artefacts: Path, cache_dir: Path, repeat: int, min_run_s: float) -> list[dict[str, Any]]:
    """Run in the child process: load the artefacts, time each detector at each batch size."""
    import numpy as np

    from detectors.manifest import load_artefacts
    from gateway.model.demo import DemoArtifacts

    manifest, detectors = load_artefacts(artefacts)
    x_test, _ = DemoArtifacts.at(cache_dir).load_test_split()
    digits = np.ascontiguousarray(x_test[len(x_test) // 2 :], dtype=np.float32)  # the held-out half
    rows = []
    for batch in MICRO_BATCHES:
        x = np.ascontiguousarray(digits[:batch])
        for name, detector in detectors.items():
            seconds = _best_seconds_per_call(
                _timed_call(name, detector, manifest.input, x), repeat, min_run_s
            )
            rows.append({
                "detector": name, "batch": batch, "us_per_call": seconds * 1e6,
                "us_per_sample": seconds * 1e6 / batch, "timed": TIMED.get(name, "score()"),
                "repeat": repeat,
            })  # fmt: skip
    return rows


def format_micro(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["detector"], r["batch"]): r for r in rows}
    names = list(dict.fromkeys(r["detector"] for r in rows))
    header = f"  {'detector':<18}" + "".join(f"{f'batch {b}':>12}" for b in MICRO_BATCHES) + "   timed"
    lines = [header, f"  {'':<18}" + "".join(f"{'us/sample':>12}" for _ in MICRO_BATCHES), "  " + "-" * 70]
    for name in names:
        cells = "".join(
            f"{by[(name, b)]['us_per_sample']:>12.2f}" if (name, b) in by else f"{'-':>12}"
            for b in MICRO_BATCHES
        )
        lines.append(f"  {name:<18}{cells}   {TIMED.get(name, 'score()')}")
    pair = [n for n in ("validation", "mahalanobis") if n in names]
    if len(pair) == 2:
        cells = "".join(f"{sum(by[(n, b)]['us_per_sample'] for n in pair):>12.2f}" for b in MICRO_BATCHES)
        lines.append(f"  {'validation+maha':<18}{cells}   sum of the two")
    return lines


# ---------------------------------------------------------------------------
# Monitors (hook for detectors.monitor_bench)
# ---------------------------------------------------------------------------


def monitor_module() -> Any | None:
    """``detectors.monitor_bench`` when it exists and imports, else None."""
    try:
        return importlib.import_module(MONITOR_MODULE)
    except ImportError:
        return None


def start_redis(workdir: Path, stack: contextlib.ExitStack) -> RedisServer:
    """``redis-server`` on a unix socket in ``workdir`` (no TCP, no persistence); stopped with ``stack``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DetectorBenchError("redis-server is not installed")
    try:
        server = start_redis_server(binary, workdir)
    except TfshieldError as exc:
        raise DetectorBenchError(str(exc)) from None
    stack.callback(server.stop)
    return server


def monitor_suite_folder(cache_dir: Path) -> Path:
    """Where the bench's monitor suite is cached: keyed by the demo model and the default monitors'
    names, so that a new default monitor gets a suite of its own."""
    from detectors.monitor_calibration import DEFAULT_MONITORS

    names = hashlib.sha256(",".join(DEFAULT_MONITORS).encode()).hexdigest()[:8]
    return cache_dir / "bench-monitors" / f"{RECIPE}-{demo_fingerprint(cache_dir)}-{names}"


def calibrated_monitor_suite(cache_dir: Path, upstream: str, log: Log) -> tuple[Path, bool]:
    """The cached monitor suite for the demo model, calibrated first (against ``upstream``) when missing.

    Returns its folder and whether it was calibrated now.
    """
    import numpy as np

    from detectors.monitor_calibration import SUITE_FILE, benign_sequences, calibrate_monitors
    from gateway.model.calibrate import UpstreamPredictor, demo_reference

    folder = monitor_suite_folder(cache_dir)
    if (folder / SUITE_FILE).is_file():
        return folder, False

    reference = demo_reference(cache_dir)
    sequences = benign_sequences(reference.calibration, np.random.default_rng(0))
    log(
        f"  monitors: calibrating on {len(sequences)} benign clients "
        f"({sum(len(q) for q in sequences)} queries) at target FPR {TARGET_FPR} per client ..."
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete entry (no suite file)
    try:
        with UpstreamPredictor(upstream, MODEL, INPUT, OUTPUT) as predictor:
            suite = calibrate_monitors(
                reference.fit, sequences, TARGET_FPR, lambda batch: _classes(predictor, batch)
            )
        suite.save(building)
        try:
            os.rename(building, folder)
        except OSError:
            if not (folder / SUITE_FILE).is_file():  # another bench finished first: fine
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder, True


def _classes(predictor: Any, batch: Any) -> Any:
    import numpy as np

    return np.asarray(predictor("", batch)).reshape(len(batch), -1).argmax(axis=1)


def monitor_inputs(cache_dir: Path, upstream: str) -> tuple[Any, Any]:
    """Held-out demo digits and the served model's classes for them."""
    import numpy as np

    from gateway.model.calibrate import UpstreamPredictor
    from gateway.model.demo import DemoArtifacts

    x_test, _ = DemoArtifacts.at(cache_dir).load_test_split()
    x = np.ascontiguousarray(x_test[len(x_test) // 2 :][:MONITOR_INPUTS], dtype=np.float32)
    with UpstreamPredictor(upstream, MODEL, INPUT, OUTPUT) as predictor:
        return x, _classes(predictor, x)


def run_monitor_bench(
    module: Any, suite: Any, x: Any, predicted: Any, workdir: Path, quick: bool
) -> dict[str, Any]:
    """``module.benchmark_monitors`` on ``suite`` (a MonitorSuite), with a private Redis when possible."""
    options: dict[str, Any] = dict(QUICK_MONITOR_OPTIONS) if quick else {}
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        redis_url = None
        if shutil.which("redis-server") is None:
            notes.append("Redis rows skipped: redis-server is not on PATH")
        else:
            redis_url = start_redis(workdir / "redis", stack).url
        result = dict(module.benchmark_monitors(suite, x, predicted, redis_url=redis_url, **options))
    result["options"] = options
    if notes:
        result["bench_notes"] = notes
    return result


def format_monitors(module: Any, result: dict[str, Any]) -> list[str]:
    formatter = getattr(module, "format_table", None)
    text = formatter(result) if callable(formatter) else json.dumps(result, indent=2, default=str)
    lines = [("  " + line).rstrip() for line in str(text).splitlines()]
    return lines + [f"  note: {note}" for note in result.get("bench_notes", [])]


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The micro-benchmark child: time the detectors in ``--artefacts``, write JSON rows to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m gateway.bench_detectors")
    parser.add_argument("--artefacts", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--min-run-s", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = measure_micro(args.artefacts, args.cache_dir, args.repeat, args.min_run_s)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
