"""``tfshield bench --quick`` runs end to end and writes a complete result file.

Speed targets are judged by the benchmark itself, never here: a loaded CI
machine must not fail a unit test. This checks the shape of the result: the
plain rows on echo, the detector rows and micro table on mnist, and the hook
that runs the monitor benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import GRPC_EXPERIMENTS
from tests.procs import REPO

QUICK_TIMEOUT_S = 120  # the run itself takes ~30 s; the rest is slack for a cold TensorFlow import
# mnist with detectors: ~25 s once calibrated; the first run in a cache also calibrates (~20 s more).
MNIST_TIMEOUT_S = 300


def run_quick_bench(args: list[str], out: Path, timeout_s: float) -> str:
    """``tfshield bench --quick ARGS --out OUT`` to completion; its output (the test fails on an error)."""
    argv = [sys.executable, "-m", "gateway.cli", "bench", "--quick", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    bench = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = bench.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        bench.send_signal(signal.SIGTERM)  # the bench stops its own children on SIGTERM
        output, _ = bench.communicate(timeout=30)
        text = output.decode(errors="replace")
        pytest.fail(f"bench --quick did not finish in {timeout_s} s:\n{text}")
    text = output.decode(errors="replace")
    assert bench.returncode == 0, text
    return text


def nginx_installed() -> bool:
    return shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)


@pytest.mark.slow
def test_quick_bench_writes_every_row_with_positive_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    nginx = nginx_installed()
    args = ["--models", "echo", "--no-monitors"] + ([] if nginx else ["--no-nginx"])
    text = run_quick_bench(args, out, QUICK_TIMEOUT_S)

    results = json.loads(out.read_text())
    targets = ["direct", "aio-floor", "gateway"] + (["nginx"] if nginx else [])
    expected = {("echo", b, c, t) for b in (1, 32) for c in (1, 16) for t in targets}
    rows = {(r["model"], r["batch"], r["concurrency"], r["target"]): r for r in results["rows"]}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["requests"] > 0, key
        assert row["errors"] == {}, key
        for name in ("rps", "p50_ms", "p99_ms", "throughput_ratio"):
            assert row[name] > 0, (key, name)
    assert all(rows[("echo", b, c, "gateway")]["requests"] > 0 for b in (1, 32) for c in (1, 16))

    gateway = results["gateway"]
    startup = gateway["startup"]
    assert gateway["idle_rss_mb"] > 0
    assert startup["spawn_to_ready_s_median"] > 0
    assert startup["spawn_to_first_response_s_median"] >= startup["spawn_to_ready_s_median"]
    assert gateway["tensorflow_loaded"] is False
    assert gateway["event_loop"] in ("asyncio", "uvloop")
    assert f"event loop: {gateway['event_loop']}" in text
    assert {check["target"].split(",")[0] for check in results["targets"]} == {
        "added p50", "throughput vs direct", "idle RSS", "start-up"
    }
    assert "targets:" in text
    assert results["detectors"] == {"enabled": False, "reason": "mnist not benchmarked"}
    # The floor: the gateway's rows carry their p50 over it, and the added-p50 targets name it.
    for b in (1, 32):
        for c in (1, 16):
            gw, floor = rows[("echo", b, c, "gateway")], rows[("echo", b, c, "aio-floor")]
            assert gw["added_p50_vs_floor_ms"] == pytest.approx(gw["p50_ms"] - floor["p50_ms"])
            assert floor["proxy_cpu_us_per_request"] > 0
    added = [check for check in results["targets"] if check["target"].startswith("added p50")]
    assert len(added) == 2 and all(check["context"].startswith("aio-floor +") for check in added)
    assert "gateway over the floor" in text
    # Both ran on the same gRPC I/O path, or "gateway over the floor" is not tfshield's cost.
    assert results["host"]["floor_grpc_experiments"] == gateway["grpc_experiments"]
    assert gateway["grpc_experiments"] == os.environ.get("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    assert "the floor ran with GRPC_EXPERIMENTS" not in text


@pytest.mark.slow
def test_quick_bench_on_mnist_adds_detector_rows_micro_table_and_target(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    out = tmp_path / "bench.json"
    args = ["--models", "mnist", "--no-nginx", "--cache-dir", str(model_cache_dir)]
    text = run_quick_bench(args, out, MNIST_TIMEOUT_S)

    results = json.loads(out.read_text())
    targets = ("direct", "aio-floor", "gateway", "gateway+valid+maha", "gateway+all", "gateway+monitors")
    if shutil.which("redis-server"):
        targets += ("gateway+monitors+redis",)
    expected = {("mnist", b, c, t) for b in (1, 32) for c in (1, 16) for t in targets}
    rows = {(r["model"], r["batch"], r["concurrency"], r["target"]): r for r in results["rows"]}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["requests"] > 0, key
        assert row["errors"] == {}, key
    for b in (1, 32):
        for c in (1, 16):
            for target in (t for t in targets if t.startswith("gateway+")):
                row = rows[("mnist", b, c, target)]
                plain = rows[("mnist", b, c, "gateway")]
                assert row["added_p50_vs_gateway_ms"] == row["p50_ms"] - plain["p50_ms"]
                assert row["throughput_ratio_vs_gateway"] > 0

    detectors = results["detectors"]
    assert detectors["enabled"] is True
    micro = {(m["detector"], m["batch"]): m["us_per_sample"] for m in detectors["micro"]}
    names = ("validation", "mahalanobis", "feature_squeezing", "autoencoder")
    assert set(micro) == {(name, b) for name in names for b in (1, 64)}
    assert all(us > 0 for us in micro.values())
    # Every measured call went through the detectors (validation checks inline and is not counted).
    scored = {t: g["scored"]["samples_scored"] for t, g in detectors["gateways"].items()}
    assert set(scored["gateway+valid+maha"]) == {"mahalanobis"}
    assert set(scored["gateway+all"]) == {"mahalanobis", "feature_squeezing", "autoencoder"}
    assert {(s["target"], s["batch"], s["concurrency"]) for s in detectors["summary"]} == {
        (t, b, c) for t in ("gateway+valid+maha", "gateway+all") for b in (1, 32) for c in (1, 16)
    }
    checks = [c for c in results["targets"] if c["target"].startswith("detectors (validation+mahalanobis)")]
    assert [c["target"] for c in checks] == [
        f"detectors (validation+mahalanobis) added p50, mnist batch {b} conc 1" for b in (1, 32)
    ]
    assert "detectors (validation+mahalanobis) added p50 at c1 \u2264 0.3 ms: " in text
    assert "us/sample" in text

    # The monitors section is there when detectors.monitor_bench is (another part of the project).
    from gateway.bench_detectors import monitor_module

    monitors = results["monitors"]
    if monitor_module() is None:
        assert monitors == {"enabled": False, "reason": "detectors.monitor_bench does not import"}
    else:
        assert monitors["enabled"] is True, monitors
        assert "memory" in monitors["result"]["backends"]
        # The gateways with every monitor on: their rows answered every call (no rate limit, no refusal).
        assert "every default monitor, the policy's ladder in shadow mode" in text


class FakeMonitorBench:
    """Stands in for detectors.monitor_bench: records its arguments, pings the Redis it is given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def benchmark_monitors(self, suite: object, x: object, predicted: object, **options: object) -> dict:
        self.calls.append({"suite": suite, "x": x, "predicted": predicted, **options})
        answered = None
        if options["redis_url"] is not None:
            import redis

            answered = redis.Redis(unix_socket_path=str(options["redis_url"]).removeprefix("unix://")).ping()
        return {"backends": {"memory": {}}, "redis_ping": answered}


def test_monitor_hook_passes_the_suite_quick_counts_and_a_running_redis_then_stops_it(tmp_path: Path) -> None:
    from gateway.bench_detectors import QUICK_MONITOR_OPTIONS, run_monitor_bench

    fake, suite = FakeMonitorBench(), object()
    result = run_monitor_bench(fake, suite, "x", "predicted", tmp_path, quick=True)

    (call,) = fake.calls
    assert (call["suite"], call["x"], call["predicted"]) == (suite, "x", "predicted")
    assert {k: call[k] for k in QUICK_MONITOR_OPTIONS} == QUICK_MONITOR_OPTIONS
    assert result["options"] == QUICK_MONITOR_OPTIONS
    if shutil.which("redis-server") is None:
        assert call["redis_url"] is None
        assert result["bench_notes"] == ["Redis rows skipped: redis-server is not on PATH"]
    else:
        assert result["redis_ping"] is True
        assert not (tmp_path / "redis" / "redis.sock").exists()  # stopped: redis removes its socket
    assert result["backends"] == {"memory": {}}


def test_the_monitor_suite_cache_is_keyed_by_the_default_monitors(
    model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detectors import monitor_calibration
    from gateway.bench_detectors import monitor_suite_folder

    before = monitor_suite_folder(model_cache_dir)
    assert monitor_suite_folder(model_cache_dir) == before
    more = (*monitor_calibration.DEFAULT_MONITORS, "new")
    monkeypatch.setattr(monitor_calibration, "DEFAULT_MONITORS", more)
    after = monitor_suite_folder(model_cache_dir)
    assert after != before and after.parent == before.parent


def _row(
    target: str, concurrency: int = 1, rounds: tuple[float, ...] = (1.0, 1.05, 1.1), **extra: object
) -> dict[str, object]:
    return {
        "model": "mnist", "batch": 32, "concurrency": concurrency, "target": target,
        "round_p50_ms": list(rounds), "idle_targets_cpu_pct": 0.0, "settle_s": [0.1] * len(rounds),
        "background_cpu_pct": 0.0, **extra,
    }  # fmt: skip


def test_measurement_notes_flag_only_what_makes_a_run_untrustworthy() -> None:
    from gateway.bench import SETTLE_MAX_S, measurement_notes

    steady = [_row(t) for t in ("direct", "aio-floor", "gateway", "gateway+valid+maha", "nginx")]
    # Heavy targets and concurrency 16 vary more by nature; the latency targets do not compare them.
    steady += [
        _row("gateway+all", rounds=(8.0, 9.5, 8.2)),
        _row("gateway", concurrency=16, rounds=(30.0, 33.0)),
    ]
    assert measurement_notes(steady) == []

    unsteady = [*steady, _row("aio-floor", rounds=(3.0, 3.4, 3.1)), _row("direct", rounds=(2.4, 3.3, 2.5))]
    (note,) = measurement_notes(unsteady)
    assert note.startswith("2 row(s) the latency targets compare")
    assert "widest: mnist batch 32 direct, 0.90 ms" in note

    busy = [*steady, _row("nginx", idle_targets_cpu_pct=15.0, background_cpu_pct=20.0)]
    busy.append(_row("gateway+monitors", settle_s=[0.1, SETTLE_MAX_S, SETTLE_MAX_S]))
    notes = measurement_notes(busy)
    assert len(notes) == 3
    assert "proxies that were not being measured used up to 15%" in notes[0]
    assert notes[1].startswith("2 slice(s) started after 3 s")
    assert "other processes used up to 20%" in notes[2]
