"""``tfshield bench --quick`` runs end to end and writes a complete result file.

Speed targets are judged by the benchmark itself, never here: a loaded CI
machine must not fail a unit test. This checks the shape of the result.
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

from tests.procs import REPO

QUICK_TIMEOUT_S = 120  # the run itself takes ~30 s; the rest is slack for a cold TensorFlow import


@pytest.mark.slow
def test_quick_bench_writes_every_row_with_positive_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "gateway.cli", "bench", "--quick", "--models", "echo", "--out", str(out)]
    nginx = shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)
    if not nginx:
        argv.append("--no-nginx")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    bench = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = bench.communicate(timeout=QUICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        bench.send_signal(signal.SIGTERM)  # the bench stops its own children on SIGTERM
        output, _ = bench.communicate(timeout=30)
        text = output.decode(errors="replace")
        pytest.fail(f"bench --quick did not finish in {QUICK_TIMEOUT_S} s:\n{text}")
    text = output.decode(errors="replace")
    assert bench.returncode == 0, text

    results = json.loads(out.read_text())
    targets = ["direct", "gateway"] + (["nginx"] if nginx else [])
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
    assert {check["target"].split(",")[0] for check in results["targets"]} == {
        "added p50", "throughput vs direct", "idle RSS", "start-up"
    }
    assert "targets:" in text
