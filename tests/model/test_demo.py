"""The cached demo model and the ``tfshield demo`` command."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from gateway.model.demo import DemoArtifacts, train_demo_model
from tests.procs import REPO, tfshield_argv


def test_the_cache_holds_model_report_and_held_out_splits(model_cache_dir: Path) -> None:
    artifacts = DemoArtifacts.at(model_cache_dir)
    assert (artifacts.model_base_path / "mnist" / "1" / "saved_model.pb").is_file()
    report = artifacts.training_report()
    assert report["test_accuracy"] >= 0.95
    assert {"seed", "training_time_s", "epochs", "test_size"} <= set(report)
    x, y = artifacts.load_test_split()
    assert x.shape == (report["test_size"], 28, 28, 1) and x.dtype == np.float32 and y.shape == (len(x),)
    with np.load(artifacts.validation_npz) as validation:
        assert validation["x"].shape[1:] == (28, 28, 1)


def test_a_complete_cache_is_reused_without_training(model_cache_dir: Path) -> None:
    started = time.monotonic()
    lines: list[str] = []
    assert (
        train_demo_model(model_cache_dir, log=lines.append)
        == DemoArtifacts.at(model_cache_dir).model_base_path
    )
    assert lines == [] and time.monotonic() - started < 1.0


def test_a_partial_cache_entry_is_not_complete(tmp_path: Path) -> None:
    artifacts = DemoArtifacts.at(tmp_path)
    artifacts.export_dir.mkdir(parents=True)
    (artifacts.export_dir / "saved_model.pb").write_bytes(b"")
    assert not artifacts.is_complete()


@pytest.mark.slow
def test_the_demo_sends_traffic_through_the_gateway_and_stops_both(model_cache_dir: Path) -> None:
    result = subprocess.run(
        [*tfshield_argv("demo", "--requests", "40", "--cache-dir", str(model_cache_dir))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={
            "PYTHONPATH": str(REPO),
            "PATH": "/usr/bin:/bin",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "HOME": str(model_cache_dir),
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "40 sent, 40 answered" in result.stdout
    accuracy = float(result.stdout.split("accuracy   ")[1].split()[0])
    assert accuracy >= 0.9
    assert "stopped gateway" in result.stdout and "stopped model-server" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_demo_kept_running_and_both_its_servers(
    model_cache_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    log_path = tmp_path / "demo.log"
    argv = tfshield_argv("demo", "--requests", "10", "--keep-running", "--cache-dir", str(model_cache_dir))
    env = {
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "HOME": str(model_cache_dir),
    }
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while "serving until Ctrl-C" not in log_path.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, log_path.read_text()
            time.sleep(0.2)
        children = psutil.Process(demo.pid).children(recursive=True)
        assert len(children) >= 2, children
        demo.send_signal(sig)
        assert demo.wait(timeout=60) == 0, log_path.read_text()
        output = log_path.read_text()
        assert "stopping" in output and "stopped gateway" in output and "stopped model-server" in output
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for child in children:
            if child.is_running():
                child.kill()
