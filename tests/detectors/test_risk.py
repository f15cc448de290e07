# ruff: noqa: F811  (test arguments named like the fixtures imported below)
"""Client risk: combining monitor results, decay, the ranked list, reset; on both stores."""

from __future__ import annotations

import pytest

from detectors.base import DetectorError
from detectors.monitor import MonitorResult, ratio_risk
from detectors.risk import RISK_SET, ClientRisk
from gateway.store import MemoryStore
from tests.redis_fixtures import redis_server, redis_url, store_factory  # noqa: F401  (fixtures)

T0 = 1_790_000_000.0  # a wall-clock time, as replicas share it


def result(monitor: str, risk: float, rate_limited: bool = False) -> MonitorResult:
    return MonitorResult(monitor, score=0.0, flagged=risk > 0.5, risk=risk, rate_limited=rate_limited)


def test_ratio_risk_is_one_half_at_the_threshold_and_monotone():
    assert ratio_risk(1.0) == 0.5
    assert ratio_risk(0.0) == 0.0
    assert ratio_risk(float("nan")) == 0.0
    assert ratio_risk(float("inf")) == 1.0
    values = [ratio_risk(r) for r in (0.25, 0.5, 0.9, 1.1, 2.0, 4.0)]
    assert values == sorted(values)
    assert ratio_risk(0.5) < 0.1 and ratio_risk(2.0) > 0.9


def test_max_combination_takes_the_most_suspicious_monitor():
    risk = ClientRisk()
    assert risk.evidence([result("a", 0.2), result("b", 0.7), result("c", 0.1)]) == 0.7
    assert risk.evidence([]) == 0.0


def test_noisy_or_combination_treats_monitors_as_independent_witnesses():
    risk = ClientRisk(combine="noisy_or")
    assert risk.evidence([result("a", 0.5), result("b", 0.5)]) == pytest.approx(0.75)


def test_a_rate_limit_carries_no_risk():
    risk = ClientRisk(combine="noisy_or")
    assert risk.evidence([result("rate_limit", 0.9, rate_limited=True)]) == 0.0


async def test_an_unknown_client_has_risk_0(store_factory):
    assert await ClientRisk().get(store_factory(), "nobody", T0) == 0.0


async def test_risk_halves_every_half_life(store_factory):
    store = store_factory()
    risk = ClientRisk(half_life_s=600.0)
    assert await risk.update(store, "alice", [result("knn", 0.8)], T0) == pytest.approx(0.8)
    assert await risk.get(store, "alice", T0 + 600.0) == pytest.approx(0.4)
    assert await risk.get(store, "alice", T0 + 1200.0) == pytest.approx(0.2)


async def test_new_evidence_raises_the_risk_but_weaker_evidence_does_not_lower_it(store_factory):
    store = store_factory()
    risk = ClientRisk(half_life_s=600.0)
    await risk.update(store, "alice", [result("knn", 0.8)], T0)
    assert await risk.update(store, "alice", [result("knn", 0.1)], T0 + 600.0) == pytest.approx(0.4)
    assert await risk.update(store, "alice", [result("prada", 0.9)], T0 + 600.0) == pytest.approx(0.9)
    assert await risk.get(store, "alice", T0 + 1200.0) == pytest.approx(0.45)


async def test_a_client_that_fades_below_the_floor_is_forgotten(store_factory):
    store = store_factory()
    risk = ClientRisk(half_life_s=1.0, track_min_risk=0.01)
    await risk.update(store, "alice", [result("knn", 0.8)], T0)
    assert await risk.update(store, "alice", [], T0 + 10.0) < 0.01
    assert await store.get_many([ClientRisk.key("alice")]) == [None]
    assert await store.ztop(RISK_SET, 10) == []


async def test_top_ranks_clients_by_their_current_risk(store_factory):
    store = store_factory()
    risk = ClientRisk(half_life_s=600.0)
    await risk.update(store, "early-high", [result("knn", 0.9)], T0)  # 0.45 at T0 + 600
    await risk.update(store, "late-mid", [result("prada", 0.6)], T0 + 600.0)
    await risk.update(store, "late-low", [result("prada", 0.2)], T0 + 600.0)
    ranked = await risk.top(store, limit=10, now=T0 + 600.0)
    assert [client for client, _ in ranked] == ["late-mid", "early-high", "late-low"]
    assert [value for _, value in ranked] == pytest.approx([0.6, 0.45, 0.2])
    assert [c for c, _ in await risk.top(store, limit=2, now=T0 + 600.0)] == ["late-mid", "early-high"]
    assert [c for c, _ in await risk.top(store, limit=10, min_risk=0.3, now=T0 + 600.0)] == [
        "late-mid",
        "early-high",
    ]


async def test_two_replicas_share_one_risk_per_client(store_factory):
    replica_a, replica_b = store_factory(), store_factory()
    risk = ClientRisk()
    await risk.update(replica_a, "alice", [result("knn", 0.7)], T0)
    assert await risk.get(replica_b, "alice", T0) == pytest.approx(0.7)
    assert [c for c, _ in await risk.top(replica_b, 5, now=T0)] == ["alice"]


async def test_reset_forgets_the_risk_and_the_ranking(store_factory):
    store = store_factory()
    risk = ClientRisk()
    await risk.update(store, "alice", [result("knn", 0.7)], T0)
    await risk.update(store, "bob", [result("knn", 0.6)], T0)
    await risk.reset(store, "alice")
    assert await risk.get(store, "alice", T0) == 0.0
    assert [c for c, _ in await risk.top(store, 5, now=T0)] == ["bob"]


async def test_a_corrupt_record_reads_as_no_risk_and_is_counted():
    store = MemoryStore()
    risk = ClientRisk()
    await store.set_many([(ClientRisk.key("alice"), b"garbage")], ttl_s=60)
    assert await risk.get(store, "alice", T0) == 0.0
    assert risk.corrupt_records_total == 1
    assert await risk.update(store, "alice", [result("knn", 0.7)], T0) == pytest.approx(0.7)


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(DetectorError, match="half_life_s must be > 0"):
        ClientRisk(half_life_s=0)
    with pytest.raises(DetectorError, match="combine must be 'max' or 'noisy_or'"):
        ClientRisk(combine="mean")  # type: ignore[arg-type]


async def test_the_monitor_risks_behind_a_rise_are_kept_and_decay_with_it(store_factory):
    store = store_factory()
    risk = ClientRisk(half_life_s=600.0)
    assert await risk.monitor_risks(store, "alice", T0) == {}
    results = [result("knn", 0.8), result("ood_rate", 0.3), result("rate_limit", 0.0, rate_limited=True)]
    assert await risk.update(store, "alice", results, T0) == pytest.approx(0.8)
    assert await risk.monitor_risks(store, "alice", T0) == pytest.approx({"knn": 0.8, "ood_rate": 0.3})
    # A lower request does not replace the record; both decay together.
    await risk.update(store, "alice", [result("prada", 0.1)], T0 + 600.0)
    later = await risk.monitor_risks(store, "alice", T0 + 600.0)
    assert later == pytest.approx({"knn": 0.4, "ood_rate": 0.15})
    assert max(later.values()) == pytest.approx(await risk.get(store, "alice", T0 + 600.0))
    # A new rise replaces it.
    await risk.update(store, "alice", [result("prada", 0.9)], T0 + 600.0)
    assert await risk.monitor_risks(store, "alice", T0 + 600.0) == pytest.approx({"prada": 0.9})
    await risk.reset(store, "alice")
    assert await risk.monitor_risks(store, "alice", T0 + 600.0) == {}


async def test_a_corrupt_monitor_record_reads_as_unknown_and_is_counted():
    store = MemoryStore()
    risk = ClientRisk()
    await risk.update(store, "alice", [result("knn", 0.8)], T0)
    (blob,) = await store.get_many([risk.monitors_key("alice")])
    assert blob is not None
    await store.set_many([(risk.monitors_key("alice"), blob[:-2])], 60.0)  # truncated
    assert await risk.monitor_risks(store, "alice", T0) == {}
    assert risk.corrupt_records_total == 1
    assert await risk.get(store, "alice", T0) == pytest.approx(0.8)  # the risk itself is intact
