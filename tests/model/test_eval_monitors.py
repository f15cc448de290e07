"""``tfshield eval monitors``: query-based attacks and a benign crowd through one monitored gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detectors.monitor_calibration import DEFAULT_MONITORS
from gateway.model.eval_monitors import (
    EVASION,
    EXTRACTION,
    client_id,
    evaluate,
    main,
    recording_policy_yaml,
)
from gateway.policy import Policy

ART_IMPORT = pytest.mark.filterwarnings("ignore:PyTorch not found:UserWarning")


def test_recording_policy_allows_at_every_risk() -> None:
    policy = Policy.from_yaml(recording_policy_yaml(), "<eval>")
    assert policy.spec.ladder.shadow is True


def test_client_ids_are_keyed_hashes_of_the_api_key() -> None:
    assert client_id("a").startswith("key:") and len(client_id("a")) == 4 + 16
    assert client_id("a") != client_id("b")


def test_unknown_attack_names_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--attacks", "nope"]) == 2
    assert "known: hopskipjump" in capsys.readouterr().err


@pytest.mark.slow
@ART_IMPORT
def test_quick_run_reports_every_attack_and_benign_population(model_cache_dir: Path, tmp_path: Path) -> None:
    report = evaluate(tmp_path, model_cache_dir, quick=True, log=lambda line: None)
    assert [a["attack"] for a in report["attacks"]] == list(EVASION + EXTRACTION)
    monitors = set(DEFAULT_MONITORS)
    for attack in report["attacks"]:
        assert attack["clients"] >= 1 and not attack["errors"], attack
        assert len(attack["queries_to_flag"]) == attack["clients"] == len(attack["progress_at_flag"])
        assert max(attack["queries_sent"]) > 0
        # Who flagged it, and what its risk peaked at, come from the control API's GetClient.
        if attack["clients_flagged"]:
            assert set(attack["flagging_monitors"]) and set(attack["flagging_monitors"]) <= monitors
        if attack["max_risk"] > 0:
            assert attack["max_risk_monitor"] in monitors
        assert (attack["attack"] in report["undetected"]) == (not attack["detected"])
    assert set(report["benign"]) == {"random", "heavy", "resend"}
    assert report["benign"]["heavy"]["queries_max"] == report["budget"]["extraction_queries"]
    assert set(report["goals"]) >= {"every_attack_detected", "no_benign_client_flagged"}
    assert json.loads((tmp_path / "monitors_eval.json").read_text())["quick"] is True
    assert (tmp_path / "monitors_eval.md").read_text().startswith("# tfshield eval monitors")
    assert (tmp_path / "risk_over_queries.png").stat().st_size > 0


def test_a_cached_suite_is_reused_only_when_it_holds_the_default_monitors(tmp_path: Path) -> None:
    from detectors.monitor_calibration import DEFAULT_MONITORS
    from gateway.model.eval_monitors import _cached_suite_is_current

    assert not _cached_suite_is_current(tmp_path)
    (tmp_path / "monitors.json").write_text(json.dumps({"monitors": list(DEFAULT_MONITORS)[:-1]}))
    assert not _cached_suite_is_current(tmp_path)
    (tmp_path / "monitors.json").write_text(json.dumps({"monitors": list(DEFAULT_MONITORS)}))
    assert _cached_suite_is_current(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["gateway ready", "attacks running"])
def test_sigterm_stops_the_servers_the_evaluation_started(
    model_cache_dir: Path, tmp_path: Path, when: str
) -> None:
    import os
    import signal
    import subprocess
    import time

    import psutil

    from tests.procs import REPO, tfshield_argv

    out = tmp_path / "out"
    cache = str(model_cache_dir)
    argv = tfshield_argv("eval", "monitors", "--quick", "--cache-dir", cache, "--out", str(out))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path = tmp_path / "eval.log"  # on a hang, the faulthandler's stacks land here
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        children: list[psutil.Process] = []
        # Wait for the gateway, the second server it starts.
        while time.monotonic() < deadline and not (out / "run" / "gateway.ready.json").exists():
            assert proc.poll() is None, "the evaluation exited before starting its servers"
            time.sleep(0.2)
        if when == "attacks running":  # the benign crowd's thread and an attack both send through the gateway
            while time.monotonic() < deadline and "[5/6]" not in log_path.read_text():
                assert proc.poll() is None, "the evaluation exited before its attacks"
                time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2, children
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 128 + signal.SIGTERM, log_path.read_text(errors="replace")[-6000:]
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"still running after the evaluation exited: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in children:  # never leave a server behind, even when the test fails
            if child.is_running():
                child.kill()
