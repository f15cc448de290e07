"""The audit log: one JSON line per decision other than a plain allow.

Each line records one decision (an applied one, or a shadow one with
``"shadow": true``; a call with both writes one line for each, joined by
``request_sha256``)::

    {"time": "2025-01-31T12:00:00.123Z", "client": "3f2a9c0b1d4e5f60", "group": "default",
     "model": "mnist", "signature": "serving_default", "method": "Predict",
     "action": "perturb", "level": 2, "rule": "ladder.2", "shadow": false,
     "scores": {"risk": 0.71, "mahalanobis": 1.8, "monitor:extraction": 0.7},
     "request_sha256": "…", "request_bytes": 3160}

- ``client`` is the client id hashed (HMAC-SHA256 with the identity salt,
  16 hex digits), never the id itself; ``scores`` are the policy's
  (:class:`gateway.policy.Decision`); the request is represented by its SHA-256
  and size only, unless forensic sampling (``forensic_sample_rate``) picks the
  call: then ``"request_b64"`` holds its bytes (at most
  ``forensic_max_bytes``; ``"request_truncated": true`` when cut).
- **Crashes**: a background thread writes each batch of lines with ``write(2)``
  on an ``O_APPEND`` descriptor, whole lines only, no user-space buffer, so
  every line it has written survives the process being killed. For the
  machine crashing too, ``fsync_every_lines`` (1: every line, the default;
  N: every N lines; 0: never) says how often it also ``fsync``\\ s. A write
  that fails half-way is truncated back, so the file holds whole lines.
- **Rotation**: when the next batch would take the file past
  ``max_file_bytes``, ``file`` becomes ``file.1`` (``.1`` becomes ``.2``, …;
  ``keep_files`` are kept) and a new file is started.
- **The event loop never waits for the disk** unless the failure mode says
  so. :meth:`AuditLog.record` queues the decision (the line is built in the
  writer thread) in a bounded queue (``max_queue_lines``). With the audit
  failure mode ``open``, it returns at once; a full queue drops the line and a
  failed write loses it, both counted. With ``closed``, it waits (at most
  ``write_timeout_s``) until the line is written (and fsynced when due), and
  raises :class:`AuditUnavailable` when the queue is full, the write fails or
  times out: the caller refuses the call rather than serve it unrecorded.

Stats:

=====================================  =========  ==================================================
tfshield_audit_lines_total             counter    - (lines written)
tfshield_audit_write_errors_total      counter    reason: no_space (ENOSPC/EDQUOT), io (other OS
                                                  errors), queue_full, timeout
=====================================  =========  ==================================================
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import errno
import hashlib
import hmac
import json
import logging
import os
import queue
import random
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.errors import ConfigError, TfshieldError
from gateway.policy import Decision

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_BATCH_LINES = 256
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class AuditUnavailable(TfshieldError):
    """A decision could not be recorded and the audit failure mode is closed: refuse the call."""


@dataclass(frozen=True)
class AuditConfig:
    """``audit:`` in the gateway config."""

    # The JSON-lines file; None: no audit log (non-allow decisions are then only counted).
    file: str | None = None
    max_file_bytes: int = 100 * MIB
    # Rotated files kept beside the current one (file.1 … file.N).
    keep_files: int = 5
    # fsync after this many lines: 1 = every line, N = every N lines, 0 = never (flush only).
    fsync_every_lines: int = 1
    # Decisions waiting for the writer thread, at most; beyond it the failure mode applies.
    max_queue_lines: int = 10000
    # Closed failure mode: how long a call waits for its line before it is refused.
    write_timeout_s: float = 1.0
    # Fraction of recorded calls whose request bytes are kept (base64) for forensics; 0 = never.
    forensic_sample_rate: float = 0.0
    forensic_max_bytes: int = 1 * MIB

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        _require(self.max_file_bytes >= 4096, f"{prefix}max_file_bytes", "must be >= 4096")
        _require(self.keep_files >= 1, f"{prefix}keep_files", "must be >= 1")
        _require(self.fsync_every_lines >= 0, f"{prefix}fsync_every_lines", "must be >= 0")
        _require(self.max_queue_lines >= 1, f"{prefix}max_queue_lines", "must be >= 1")
        _require(self.write_timeout_s > 0, f"{prefix}write_timeout_s", "must be > 0")
        _require(
            0.0 <= self.forensic_sample_rate <= 1.0,
            f"{prefix}forensic_sample_rate",
            "must be between 0 and 1",
        )
        _require(self.forensic_max_bytes >= 0, f"{prefix}forensic_max_bytes", "must be >= 0")


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lines = Counter("tfshield_audit_lines", "Audit lines written.", registry=registry)
        self.write_errors = Counter(
            "tfshield_audit_write_errors",
            "Audit lines not written, by reason (no_space, io, queue_full, timeout).",
            ["reason"],
            registry=registry,
        )
        for reason in ("no_space", "io", "queue_full", "timeout"):
            self.write_errors.labels(reason)


@dataclass(frozen=True, slots=True)
class _Entry:
    unix_s: float
    decision: Decision
    client_id: str
    model: str
    signature: str
    method: str
    request: bytes
    forensic: bool
    done: concurrent.futures.Future[None] | None


_STOP = object()


def _require(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {problem}")


def _iso(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """The audit log writer (one per gateway). ``salt`` keys the client-id hash."""

    def __init__(
        self,
        config: AuditConfig,
        registry: CollectorRegistry,
        salt: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not config.file:
            raise ValueError("AuditLog needs audit.file")
        self.config = config
        self.path = config.file
        self.metrics = AuditMetrics(registry)
        self._salt = salt
        self._clock = clock
        self._random = random.Random()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.max_queue_lines)
        # Indirection so tests can stall or fail the disk.
        self._write: Callable[[int, Any], int] = os.write
        self._fsync: Callable[[int], None] = os.fsync
        self._fd = -1
        self._size = 0
        self._regular = False
        self._unsynced = 0
        self._thread = threading.Thread(target=self._run, name="tfshield-audit", daemon=True)
        self._open()  # a file that cannot be opened at start is a config error, reported now
        self._thread.start()

    # -- the caller's side (event loop) ------------------------------------------------------

    async def record(
        self,
        decision: Decision,
        *,
        client_id: str,
        model: str,
        signature: str,
        method: str,
        request: bytes,
        failure_mode: str = "closed",
    ) -> None:
        """Queue the lines of one call's decision (applied and shadow ones).

        ``open``: returns at once. ``closed``: returns once written, else raises
        :class:`AuditUnavailable` (the reason is counted either way).
        """
        closed = failure_mode == "closed"
        done: concurrent.futures.Future[None] | None = concurrent.futures.Future() if closed else None
        rate = self.config.forensic_sample_rate
        forensic = rate > 0 and self._random.random() < rate
        entry = _Entry(self._clock(), decision, client_id, model, signature, method, request, forensic, done)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.metrics.write_errors.labels("queue_full").inc(_lines_of(decision))
            if closed:
                raise AuditUnavailable("the audit log is behind (its queue is full)") from None
            return
        if done is None:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), self.config.write_timeout_s)
        except TimeoutError:
            self.metrics.write_errors.labels("timeout").inc(_lines_of(decision))
            raise AuditUnavailable(
                f"the audit line was not written within {self.config.write_timeout_s} s"
            ) from None
        except OSError as exc:
            raise AuditUnavailable(f"the audit log cannot be written: {exc.strerror or exc}") from None

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer thread and close the file."""
        if self._thread.is_alive():
            # Blocks only when the queue is full: the writer is draining it.
            self._queue.put(_STOP)
            self._thread.join(timeout_s)
        if self._fd >= 0 and not self._thread.is_alive():
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    # -- the writer thread ------------------------------------------------------------------------

    def client_hash(self, client_id: str) -> str:
        return hmac.new(self._salt, client_id.encode(), hashlib.sha256).hexdigest()[:16]

    def _lines(self, entry: _Entry) -> bytes:
        decision = entry.decision
        common: dict[str, Any] = {
            "time": _iso(entry.unix_s),
            "client": self.client_hash(entry.client_id),
            "group": decision.group,
            "model": entry.model,
            "signature": entry.signature,
            "method": entry.method,
        }
        request: dict[str, Any] = {
            "request_sha256": hashlib.sha256(entry.request).hexdigest(),
            "request_bytes": len(entry.request),
        }
        if entry.forensic:
            kept = entry.request[: self.config.forensic_max_bytes]
            request["request_b64"] = base64.b64encode(kept).decode("ascii")
            if len(kept) < len(entry.request):
                request["request_truncated"] = True
        decisions = ([decision] if decision.action != "allow" else []) + list(decision.shadowed)
        lines = []
        for d in decisions:
            line = {
                **common,
                "action": d.action,
                "level": d.level,
                "rule": d.rule,
                "shadow": d.shadow,
                "scores": {k: _finite(v) for k, v in d.scores.items()},
                **request,
            }
            lines.append(json.dumps(line, separators=(",", ":"), allow_nan=False).encode() + b"\n")
        return b"".join(lines)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < _BATCH_LINES:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            entries = [e for e in batch if e is not _STOP]
            if entries:
                self._write_batch(entries)
            if any(e is _STOP for e in batch):
                return

    def _write_batch(self, entries: list[_Entry]) -> None:
        data = b"".join(self._lines(e) for e in entries)
        count = data.count(b"\n")
        try:
            if self._fd < 0:
                self._open()
            if self._regular and self._size > 0 and self._size + len(data) > self.config.max_file_bytes:
                self._rotate()
            self._write_all(data)
            self._unsynced += count
            every = self.config.fsync_every_lines
            if every and self._unsynced >= every:
                self._fsync(self._fd)
                self._unsynced = 0
        except OSError as exc:
            reason = "no_space" if exc.errno in _NO_SPACE else "io"
            self.metrics.write_errors.labels(reason).inc(count)
            log.warning("audit log %s: %d line(s) not written: %s", self.path, count, exc.strerror or exc)
            for entry in entries:
                _resolve(entry.done, exc)
            if reason == "io":
                self._close_fd()  # reopen next time: the file may have been moved or removed
            return
        self.metrics.lines.inc(count)
        for entry in entries:
            _resolve(entry.done, None)

    def _write_all(self, data: bytes) -> None:
        start = self._size
        view = memoryview(data)
        try:
            while view:
                written = self._write(self._fd, view)
                view = view[written:]
                self._size += written
        except OSError:
            if self._regular and self._size != start:
                # Keep whole lines only: cut what part of this batch got in.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                    self._size = start
            raise

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        info = os.fstat(fd)
        self._fd, self._size, self._regular = fd, info.st_size, stat.S_ISREG(info.st_mode)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1

    def _rotate(self) -> None:
        if self.config.fsync_every_lines and self._unsynced:
            self._fsync(self._fd)
            self._unsynced = 0
        self._close_fd()
        keep = self.config.keep_files
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.path}.{keep}")
        for i in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()


def _resolve(done: concurrent.futures.Future[None] | None, exc: BaseException | None) -> None:
    if done is None:
        return
    # The caller may have given up (timeout) and cancelled it meanwhile.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)


def _lines_of(decision: Decision) -> int:
    return (decision.action != "allow") + len(decision.shadowed)


def _finite(value: float) -> float | str:
    # JSON has no NaN/Infinity; a detector may produce them.
    return value if value == value and abs(value) != float("inf") else str(value)
