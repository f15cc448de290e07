"""Client risk: one number in [0, 1] per client, from its monitors, fading when it behaves.

After each request the gateway hands the monitors' results to
:meth:`ClientRisk.update`. The request's evidence is the largest monitor risk
(``combine="max"``, default) or their noisy-OR (``1 − Π(1 − r_i)``, for
monitors treated as independent witnesses). Each monitor's risk is 0.5
exactly at its calibrated threshold (:func:`detectors.monitor.ratio_risk`),
so with ``max`` a client's risk is ≥ 0.5 iff some monitor flagged it.

The client's risk is the larger of that evidence and its previous risk
decayed with half-life ``half_life_s``: a flagged client stays suspicious
for a while, then fades back if the monitors stop flagging it. Monitors
already summarise the whole sequence, so the risk is not accumulated query by
query (that would make volume alone raise it). Rate-limit results carry no
risk.

Storage: ``tfs:risk:<client>`` holds (risk, time) as 16 bytes; beside it,
``tfs:riskm:<client>`` holds the monitor risks of the request that last raised
the client's risk (why it is where it is; :meth:`ClientRisk.monitor_risks`),
written with it and decayed like it. The sorted
set ``tfs:risk`` lists clients for ``ListClients``. Its score is
``log2(risk) + time / half_life_s``: the risk decayed to any common instant
is ``2 ** (score − now / half_life_s)``, a monotone function of the score, so
the set ranks clients by their *current* risk without being rewritten as
risks decay. A client whose risk falls below ``track_min_risk`` leaves the
set, and the per-client key expires once its decayed risk would be below it.
All times are seconds on a clock shared by every replica (``time.time()``).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterable
from typing import Literal

from detectors.base import DetectorError
from detectors.monitor import MonitorResult
from gateway.store import Store

__all__ = ["ClientRisk", "RISK_SET"]

RISK_SET = "tfs:risk"
_RECORD = struct.Struct("<dd")  # risk, time (s)
_MONITOR_RISK = struct.Struct("<f")  # after a one-byte name length and the name
MAX_MONITORS_RECORDED = 32


class ClientRisk:
    """Per-client risk with exponential decay, kept in a store.

    ``half_life_s`` (> 0, default 600): seconds for a risk to halve.
    ``combine`` ("max" or "noisy_or", default "max"): how one request's monitor risks combine.
    ``track_min_risk`` (in (0, 1), default 0.01): below it a client is forgotten.
    ``max_ttl_s`` (default 86400): the longest a risk record is kept.
    """

    def __init__(
        self,
        half_life_s: float = 600.0,
        combine: Literal["max", "noisy_or"] = "max",
        track_min_risk: float = 0.01,
        max_ttl_s: float = 86400.0,
    ) -> None:
        if not half_life_s > 0:
            raise DetectorError(f"risk: half_life_s must be > 0, got {half_life_s}")
        if combine not in ("max", "noisy_or"):
            raise DetectorError(f"risk: combine must be 'max' or 'noisy_or', got {combine!r}")
        if not 0.0 < track_min_risk < 1.0:
            raise DetectorError(f"risk: track_min_risk must be in (0, 1), got {track_min_risk}")
        if not max_ttl_s > 0:
            raise DetectorError(f"risk: max_ttl_s must be > 0, got {max_ttl_s}")
        self.half_life_s = float(half_life_s)
        self.combine = combine
        self.track_min_risk = float(track_min_risk)
        self.max_ttl_s = float(max_ttl_s)
        # Records that did not decode and were read as "no risk" (export as a metric).
        self.corrupt_records_total = 0

    @staticmethod
    def key(client: str) -> str:
        return f"tfs:risk:{client}"

    @staticmethod
    def monitors_key(client: str) -> str:
        return f"tfs:riskm:{client}"

    def decayed(self, risk: float, since: float, now: float) -> float:
        return risk * 0.5 ** (max(0.0, now - since) / self.half_life_s)

    def evidence(self, results: Iterable[MonitorResult]) -> float:
        """One request's risk from its monitor results (rate limits carry none)."""
        risks = [min(1.0, max(0.0, r.risk)) for r in results if not r.rate_limited and math.isfinite(r.risk)]
        if not risks:
            return 0.0
        if self.combine == "max":
            return max(risks)
        survive = 1.0
        for risk in risks:
            survive *= 1.0 - risk
        return 1.0 - survive

    def _read(self, blob: bytes | None, now: float) -> float:
        if blob is None:
            return 0.0
        if len(blob) != _RECORD.size:
            self.corrupt_records_total += 1
            return 0.0
        risk, since = _RECORD.unpack(blob)
        if not (math.isfinite(risk) and math.isfinite(since)) or not 0.0 <= risk <= 1.0:
            self.corrupt_records_total += 1
            return 0.0
        return self.decayed(risk, since, now)

    async def get(self, store: Store, client: str, now: float) -> float:
        """The client's risk at ``now`` (0 for a client never seen or forgotten)."""
        (blob,) = await store.get_many([self.key(client)])
        return self._read(blob, now)

    async def update(self, store: Store, client: str, results: Iterable[MonitorResult], now: float) -> float:
        """Fold one request's monitor results into the client's risk; returns the new risk."""
        key = self.key(client)
        (blob,) = await store.get_many([key])
        previous = self._read(blob, now)
        risk = max(previous, self.evidence(results))
        if risk < self.track_min_risk:
            if blob is not None:
                await store.delete([key])
                await store.zrem(RISK_SET, client)
            return risk
        if risk > previous or blob is None or previous == 0.0:
            # Only a rise needs writing: an unchanged record decays by itself.
            ttl_s = min(self.max_ttl_s, self.half_life_s * math.log2(risk / self.track_min_risk) + 1.0)
            record = _RECORD.pack(risk, now)
            await store.set_many(
                [(key, record), (self.monitors_key(client), record + _pack_monitor_risks(results))], ttl_s
            )
            await store.zadd(RISK_SET, client, math.log2(risk) + now / self.half_life_s)
        return risk

    async def monitor_risks(self, store: Store, client: str, now: float) -> dict[str, float]:
        """The monitor risks behind the client's current risk, decayed like it ({} when unknown)."""
        (blob,) = await store.get_many([self.monitors_key(client)])
        if blob is None or len(blob) < _RECORD.size:
            return {}
        risks = _unpack_monitor_risks(blob[_RECORD.size :])
        if risks is None:
            self.corrupt_records_total += 1
            return {}
        _, since = _RECORD.unpack(blob[: _RECORD.size])
        if not math.isfinite(since):
            return {}
        return {name: self.decayed(risk, since, now) for name, risk in risks.items()}

    async def top(
        self, store: Store, limit: int, min_risk: float = 0.0, now: float | None = None
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` clients with the highest current risk ≥ ``min_risk``, highest first."""
        now = time.time() if now is None else now
        floor = max(min_risk, self.track_min_risk)
        min_score = math.log2(floor) + now / self.half_life_s
        rows = await store.ztop(RISK_SET, limit, min_score)
        return [(client, min(1.0, 2.0 ** (score - now / self.half_life_s))) for client, score in rows]

    async def reset(self, store: Store, client: str) -> None:
        """Forget the client's risk (its monitors' state is reset separately)."""
        await store.delete([self.key(client), self.monitors_key(client)])
        await store.zrem(RISK_SET, client)


def _pack_monitor_risks(results: Iterable[MonitorResult]) -> bytes:
    """Each monitor's risk as (name length, name, float32); rate limits carry none."""
    out = bytearray()
    for result in list(results)[:MAX_MONITORS_RECORDED]:
        if result.rate_limited or not math.isfinite(result.risk):
            continue
        name = result.monitor.encode()[:255]
        out += bytes([len(name)]) + name + _MONITOR_RISK.pack(min(1.0, max(0.0, result.risk)))
    return bytes(out)


def _unpack_monitor_risks(blob: bytes) -> dict[str, float] | None:
    """The inverse of :func:`_pack_monitor_risks`; None when the bytes do not parse."""
    risks: dict[str, float] = {}
    at = 0
    while at < len(blob):
        length = blob[at]
        end = at + 1 + length + _MONITOR_RISK.size
        if end > len(blob) or len(risks) >= MAX_MONITORS_RECORDED:
            return None
        try:
            name = blob[at + 1 : at + 1 + length].decode()
        except UnicodeDecodeError:
            return None
        (risk,) = _MONITOR_RISK.unpack(blob[at + 1 + length : end])
        if not 0.0 <= risk <= 1.0:
            return None
        risks[name] = float(risk)
        at = end
    return risks
