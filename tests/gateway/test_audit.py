"""The audit log: one JSON line per non-allow decision, durable, rotated, and honest about failures."""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry

from gateway.audit import AuditConfig, AuditLog, AuditUnavailable
from gateway.config import ConfigError, _build
from gateway.policy import Decision
from tests.procs import REPO

SALT = b"identity-salt-for-tests"
REQUEST = b"\x0a\x07\x0a\x05mnist" + bytes(range(256)) * 4
PERTURB = Decision(
    "perturb", 2, "ladder.2", False, MappingProxyType({"risk": 0.7, "mahalanobis": 1.5}), "default"
)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def errors(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("tfshield_audit_write_errors_total", {"reason": reason}) or 0.0


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def make_log(tmp_path: Path, registry: CollectorRegistry) -> Iterator:
    logs: list[AuditLog] = []

    def make(**options) -> AuditLog:
        options.setdefault("file", str(tmp_path / "audit.jsonl"))
        audit = AuditLog(AuditConfig(**options), registry, SALT, clock=lambda: 1_700_000_000.25)
        logs.append(audit)
        return audit

    yield make
    for audit in logs:
        audit.close()


async def record(audit: AuditLog, decision: Decision = PERTURB, mode: str = "closed", **fields) -> None:
    values = {
        "client_id": "mtls:alice",
        "model": "mnist",
        "signature": "serving_default",
        "method": "Predict",
    }
    values.update(fields)
    await audit.record(decision, request=REQUEST, failure_mode=mode, **values)


async def test_a_decision_is_one_json_line_with_the_client_hashed_and_the_request_digested(
    make_log, tmp_path: Path, registry: CollectorRegistry
) -> None:
    audit = make_log()
    await record(audit)
    (line,) = lines(tmp_path / "audit.jsonl")
    assert line == {
        "time": "2023-11-14T22:13:20.250Z",
        "client": audit.client_hash("mtls:alice"),
        "group": "default",
        "model": "mnist",
        "signature": "serving_default",
        "method": "Predict",
        "action": "perturb",
        "level": 2,
        "rule": "ladder.2",
        "shadow": False,
        "scores": {"risk": 0.7, "mahalanobis": 1.5},
        "request_sha256": hashlib.sha256(REQUEST).hexdigest(),
        "request_bytes": len(REQUEST),
    }
    raw = (tmp_path / "audit.jsonl").read_text()
    assert "alice" not in raw and "mnist\\u" not in raw
    assert line["client"] == hmac.new(SALT, b"mtls:alice", hashlib.sha256).hexdigest()[:16]
    assert registry.get_sample_value("tfshield_audit_lines_total") == 1


async def test_each_shadow_decision_is_its_own_line(make_log, tmp_path: Path) -> None:
    audit = make_log()
    shadow = Decision("block", 0, "try-block", True, MappingProxyType({"risk": 0.2}))
    await record(audit, Decision("allow", 0, "ladder.0", shadowed=(shadow,)))
    await record(
        audit, Decision("perturb", 1, "ladder.1", scores=MappingProxyType({"risk": 0.4}), shadowed=(shadow,))
    )
    assert [(x["action"], x["rule"], x["shadow"]) for x in lines(tmp_path / "audit.jsonl")] == [
        ("block", "try-block", True),
        ("perturb", "ladder.1", False),
        ("block", "try-block", True),
    ]


async def test_forensic_sampling_keeps_the_request_bytes_up_to_a_limit(make_log, tmp_path: Path) -> None:
    audit = make_log(forensic_sample_rate=1.0, forensic_max_bytes=100)
    await record(audit)
    (line,) = lines(tmp_path / "audit.jsonl")
    assert base64.b64decode(line["request_b64"]) == REQUEST[:100]
    assert line["request_truncated"] is True


async def test_without_sampling_the_request_content_is_never_written(make_log, tmp_path: Path) -> None:
    audit = make_log()
    for _ in range(20):
        await record(audit)
    assert all("request_b64" not in line for line in lines(tmp_path / "audit.jsonl"))


async def test_non_finite_scores_are_written_as_text(make_log, tmp_path: Path) -> None:
    audit = make_log()
    await record(audit, Decision("block", 0, "r", scores=MappingProxyType({"risk": 1.0, "ae": float("inf")})))
    assert lines(tmp_path / "audit.jsonl")[0]["scores"] == {"risk": 1.0, "ae": "inf"}


# -- durability ---------------------------------------------------------------------------------------

_WRITER = """
import asyncio, sys
from types import MappingProxyType
from prometheus_client import CollectorRegistry
from gateway.audit import AuditConfig, AuditLog
from gateway.policy import Decision

async def main():
    audit = AuditLog(AuditConfig(file=sys.argv[1], fsync_every_lines=0), CollectorRegistry(), b"salt")
    decision = Decision("block", 0, "r", scores=MappingProxyType({"risk": 1.0}))
    n = 0
    while True:
        await audit.record(decision, client_id="c", model="m", signature="s", method="Predict",
                           request=b"x" * 500, failure_mode="closed")
        n += 1
        print(n, flush=True)

asyncio.run(main())
"""


def test_every_line_written_before_a_kill_9_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        written = 0
        while written < 300:
            written = int(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    text = path.read_text()
    assert text.endswith("\n")
    recovered = [json.loads(line) for line in text.splitlines()]  # every line parses
    assert len(recovered) >= written  # everything acknowledged survived (and perhaps a few more)


@pytest.mark.parametrize("every, syncs", [(1, 6), (3, 2), (0, 0)])
async def test_fsync_follows_the_configured_policy(make_log, every: int, syncs: int) -> None:
    audit = make_log(fsync_every_lines=every)
    calls: list[int] = []
    audit._fsync = lambda fd: calls.append(fd)
    for _ in range(6):
        await record(audit)
    assert len(calls) == syncs


async def test_files_rotate_by_size_and_only_keep_files_are_kept(make_log, tmp_path: Path) -> None:
    audit = make_log(max_file_bytes=4096, keep_files=2)
    for i in range(60):
        await record(audit, model=f"model-{i:02d}")
    path = tmp_path / "audit.jsonl"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 4096
    newest = lines(path)
    assert newest[-1]["model"] == "model-59"
    older = lines(tmp_path / "audit.jsonl.2") + lines(tmp_path / "audit.jsonl.1") + newest
    models = [line["model"] for line in older]
    assert models == sorted(models) and models[-1] == "model-59"  # in order, the oldest dropped


# -- failures -------------------------------------------------------------------------------------------


async def test_a_full_disk_is_counted_and_refuses_when_closed(make_log, registry: CollectorRegistry) -> None:
    audit = make_log(file="/dev/full")
    with pytest.raises(AuditUnavailable, match="^the audit log cannot be written: No space left on device$"):
        await record(audit, mode="closed")
    assert errors(registry, "no_space") == 1


async def test_a_full_disk_is_counted_and_serving_goes_on_when_open(
    make_log, registry: CollectorRegistry
) -> None:
    audit = make_log(file="/dev/full")
    for _ in range(3):
        await record(audit, mode="open")  # returns at once
    audit.close()
    assert errors(registry, "no_space") == 3
    assert registry.get_sample_value("tfshield_audit_lines_total") == 0


async def test_a_failed_write_leaves_whole_lines_only(
    make_log, tmp_path: Path, registry: CollectorRegistry
) -> None:
    audit = make_log()
    await record(audit)
    real_write = os.write

    def half_then_fail(fd: int, data) -> int:
        if len(data) > 10:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.EIO, "Input/output error")

    audit._write = half_then_fail
    with pytest.raises(AuditUnavailable, match="Input/output error"):
        await record(audit)
    audit._write = real_write
    await record(audit)
    assert len(lines(tmp_path / "audit.jsonl")) == 2
    assert errors(registry, "io") == 1


async def test_a_full_queue_drops_when_open_and_refuses_when_closed(
    make_log, registry: CollectorRegistry
) -> None:
    audit = make_log(max_queue_lines=2)
    stalled, release = threading.Event(), threading.Event()
    real_write = audit._write

    def stall(fd: int, data) -> int:
        stalled.set()
        release.wait(10)
        return real_write(fd, data)

    audit._write = stall
    await record(audit, mode="open")
    assert stalled.wait(5)  # the writer holds the first line; the queue is empty again
    await record(audit, mode="open")
    await record(audit, mode="open")  # the queue is full now
    await record(audit, mode="open")
    assert errors(registry, "queue_full") == 1
    with pytest.raises(AuditUnavailable, match=r"^the audit log is behind \(its queue is full\)$"):
        await record(audit, mode="closed")
    assert errors(registry, "queue_full") == 2
    release.set()
    audit.close()
    assert registry.get_sample_value("tfshield_audit_lines_total") == 3


async def test_a_slow_disk_times_out_when_closed(make_log, registry: CollectorRegistry) -> None:
    audit = make_log(write_timeout_s=0.05)
    release = threading.Event()
    real_write = audit._write
    audit._write = lambda fd, data: (release.wait(10), real_write(fd, data))[1]
    with pytest.raises(AuditUnavailable, match=r"^the audit line was not written within 0.05 s$"):
        await record(audit, mode="closed")
    assert errors(registry, "timeout") == 1
    release.set()


def test_an_unopenable_file_fails_at_start(tmp_path: Path, registry: CollectorRegistry) -> None:
    with pytest.raises(FileNotFoundError):
        AuditLog(AuditConfig(file=str(tmp_path / "missing" / "audit.jsonl")), registry, SALT)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"keep_files": 0}, "audit.keep_files: must be >= 1"),
        ({"max_file_bytes": 10}, "audit.max_file_bytes: must be >= 4096"),
        ({"forensic_sample_rate": 2}, "audit.forensic_sample_rate: must be between 0 and 1"),
        ({"fsync_every_lines": -1}, "audit.fsync_every_lines: must be >= 0"),
    ],
)
def test_audit_config_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _build(AuditConfig, data, "audit")
    assert str(error.value) == message
