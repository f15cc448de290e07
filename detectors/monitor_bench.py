"""What the monitors cost: microseconds per query, bytes of state per client, the 1 GiB budget.

:func:`benchmark_monitors` (``tfshield bench`` calls it) measures, for each
monitor of a calibrated :class:`~detectors.monitor_calibration.MonitorSuite`:

- **µs per query** on the memory store and, given ``redis_url``, on Redis:
  one client sends ``queries`` single-sample requests after ``warmup``
  requests that fill its state (so the cost measured is the steady state, the
  largest it gets), timed around ``observe``; median and 99th percentile.
  The shared embedding is timed separately (the gateway computes it once per
  request for all monitors), and so is :class:`~detectors.risk.ClientRisk`'s update;
- **bytes per client**: the encoded state after warm-up (bounded by
  ``max_state_bytes``), and what a client really costs in each store:
  in memory, measured with ``tracemalloc`` over ``clients`` synthetic clients
  (dict entries, key strings, bytes objects); in Redis, ``MEMORY USAGE`` of its keys;
- **the budget**: bytes per client × 100,000 against 1 GiB;
- **Blacklight's index**: bytes per distinct query indexed (global, not per
  client: bounded by ``ttl_s`` × the rate of distinct queries).

Numbers depend on the machine; the table printed by :func:`format_table` is
what the report quotes.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import numpy as np

from detectors.blacklight import Blacklight
from detectors.monitor import Monitor, MonitorResult, QueryBatch, prepare_batches, run_sync
from detectors.monitor_calibration import MonitorSuite
from detectors.risk import RISK_SET, ClientRisk
from gateway.store import MemoryStore, RedisStore, Store

__all__ = ["BUDGET_BYTES", "BUDGET_CLIENTS", "abenchmark_monitors", "benchmark_monitors", "format_table"]

BUDGET_CLIENTS = 100_000
BUDGET_BYTES = 1 << 30


def _client_id(i: int) -> str:
    return f"{i:016x}"  # like a hashed API key: 16 hex characters


async def _time_monitor(m: Monitor, store: Store, batches: list[QueryBatch], warmup: int) -> dict[str, float]:
    client = _client_id(1)
    now = time.time()
    for i, batch in enumerate(batches[:warmup]):
        await m.observe(store, client, batch, now + 0.001 * i)
    timings = []
    for i, batch in enumerate(batches[warmup:]):
        started = time.perf_counter()
        await m.observe(store, client, batch, now + 0.001 * (warmup + i))
        timings.append(time.perf_counter() - started)
    timings_us = np.array(timings) * 1e6
    return {"median_us": float(np.median(timings_us)), "p99_us": float(np.percentile(timings_us, 99))}


async def _time_risk(store: Store, results: list, queries: int) -> dict[str, float]:
    risk = ClientRisk()
    now = time.time()
    timings = []
    for i in range(queries):
        started = time.perf_counter()
        await risk.update(store, _client_id(2), results, now + 0.001 * i)
        timings.append(time.perf_counter() - started)
    timings_us = np.array(timings) * 1e6
    return {"median_us": float(np.median(timings_us)), "p99_us": float(np.percentile(timings_us, 99))}


def _memory_bytes_per_client(blobs: dict[str, list[tuple[str, bytes]]], clients: int) -> float:
    """Traced bytes per client of a MemoryStore holding every monitor's state, the client's
    risk record and its member of the ranked risk set, for ``clients`` clients."""
    tracemalloc.start()
    try:
        store = MemoryStore(max_keys=1 << 40)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(clients):
            client = _client_id(i)
            items = [
                (key_template.replace("{client}", client), bytes(bytearray(blob)))
                for templates in blobs.values()
                for key_template, blob in templates
            ]
            run_sync(store.set_many(items, ttl_s=3600))
            run_sync(store.zadd(RISK_SET, client, float(i)))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / clients


async def _redis_bytes_per_client(url: str, keys: list[str], members: int = 1000) -> float:
    """``MEMORY USAGE`` of one client's keys, plus its share of a ranked set of ``members`` clients."""
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(url)
    try:
        total = 0.0
        for key in keys:
            total += int(await client.memory_usage(key, samples=0) or 0)
        probe = "tfs:bench:zset"
        await client.zadd(probe, {_client_id(i): float(i) for i in range(members)})
        total += int(await client.memory_usage(probe, samples=0) or 0) / members
        await client.delete(probe)
        return float(total)
    finally:
        await client.aclose()


async def _redis_used_memory(url: str) -> int:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(url)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


async def abenchmark_monitors(
    suite: MonitorSuite,
    x: np.ndarray,
    predicted: np.ndarray,
    *,
    queries: int = 500,
    warmup: int = 300,
    clients: int = 2000,
    redis_url: str | None = None,
    index_queries: int = 500,
) -> dict[str, Any]:
    """Measure every monitor of ``suite`` on samples ``x`` (test digits) and their ``predicted`` classes.

    ``queries`` timed single-sample requests after ``warmup`` ones;
    ``clients`` synthetic clients for the memory footprint; ``redis_url``
    also measures Redis (its keys are flushed first and after: use a Redis of
    its own); ``index_queries`` distinct queries measure Blacklight's index.
    """
    n = warmup + queries
    rng = np.random.default_rng(0)
    order = rng.integers(0, len(x), n)
    sample = np.asarray(x)[order]
    labels = np.asarray(predicted)[order]
    embed_timings = []
    for i in range(min(n, 300)):
        started = time.perf_counter()
        suite.embedding.transform(sample[i : i + 1])
        embed_timings.append(time.perf_counter() - started)
    batches = prepare_batches(sample, suite.embedding.transform, lambda _: labels)

    report: dict[str, Any] = {
        "queries": queries,
        "warmup": warmup,
        "embedding_median_us": float(np.median(embed_timings) * 1e6),
        "backends": {},
        "state_bytes": {},
    }
    backends: list[tuple[str, Store]] = [("memory", MemoryStore(max_keys=1 << 40))]
    redis_store: RedisStore | None = None
    if redis_url is not None:
        redis_store = RedisStore(redis_url, timeout_s=1.0)
        await redis_store._redis.flushdb()
        backends.append(("redis", redis_store))
    try:
        for backend, store in backends:
            row: dict[str, dict[str, float]] = {}
            for name, m in suite.monitors.items():
                row[name] = await _time_monitor(m, store, batches, warmup)
            results = [
                await m.observe(store, _client_id(3), batches[0], time.time())
                for m in suite.monitors.values()
            ]
            row["risk"] = await _time_risk(store, results, min(queries, 200))
            report["backends"][backend] = row

        # Encoded state per client (after warm-up, the client above).
        memory = backends[0][1]
        templates: dict[str, list[tuple[str, bytes]]] = {}
        for name, m in suite.monitors.items():
            keys = m.client_keys(_client_id(1))
            values = await memory.get_many(keys)
            templates[name] = [
                (key.replace(_client_id(1), "{client}"), value)
                for key, value in zip(keys, values, strict=True)
                if value is not None
            ]
            report["state_bytes"][name] = {
                "encoded": sum(len(v) for _, v in templates[name]),
                "max_state_bytes": int(m.max_state_bytes),
            }
        # The risk record and the monitor risks behind it, as a flagged client has them.
        flagged = [MonitorResult(name, 0.0, True, 0.9) for name in suite.monitors]
        await ClientRisk().update(memory, _client_id(4), flagged, time.time())
        risk_keys = [ClientRisk.key(_client_id(4)), ClientRisk.monitors_key(_client_id(4))]
        risk_values = await memory.get_many(risk_keys)
        templates["risk"] = [
            (key.replace(_client_id(4), "{client}"), value)
            for key, value in zip(risk_keys, risk_values, strict=True)
            if value is not None
        ]
        risk_bytes = sum(len(v) for _, v in templates["risk"])
        report["state_bytes"]["risk"] = {"encoded": risk_bytes, "max_state_bytes": risk_bytes}
        encoded_total = sum(v["encoded"] for v in report["state_bytes"].values())
        # Every client counted with a risk record and a place in the ranked set (an upper bound:
        # only clients at risk have them).
        per_client_memory = _memory_bytes_per_client(templates, clients)
        budget: dict[str, Any] = {
            "clients": BUDGET_CLIENTS,
            "budget_bytes": BUDGET_BYTES,
            "encoded_bytes_per_client": encoded_total,
            "memory_bytes_per_client": per_client_memory,
        }
        budget["memory_total_bytes"] = budget["memory_bytes_per_client"] * BUDGET_CLIENTS
        budget["memory_fits"] = budget["memory_total_bytes"] <= BUDGET_BYTES
        if redis_store is not None and redis_url is not None:
            keys = [
                key
                for name, m in suite.monitors.items()
                for key in m.client_keys(_client_id(1))
                if report["state_bytes"][name]["encoded"] > 0
            ]
            suspicious = [MonitorResult(name, 0.0, True, 0.9) for name in suite.monitors]
            await ClientRisk().update(redis_store, _client_id(1), suspicious, time.time())
            keys += [ClientRisk.key(_client_id(1)), ClientRisk.monitors_key(_client_id(1))]
            redis_per_client = await _redis_bytes_per_client(redis_url, keys)
            budget["redis_bytes_per_client"] = redis_per_client
            budget["redis_total_bytes"] = redis_per_client * BUDGET_CLIENTS
            budget["redis_fits"] = budget["redis_total_bytes"] <= BUDGET_BYTES
        report["budget"] = budget

        # Blacklight's global index: bytes per distinct query.
        blacklight = next((m for m in suite.monitors.values() if isinstance(m, Blacklight)), None)
        if blacklight is not None:
            distinct = rng.uniform(0.0, 1.0, (index_queries, *np.asarray(x).shape[1:])).astype(np.float32)
            distinct_batches = prepare_batches(distinct, None, None)
            index: dict[str, float] = {"keys_per_query": float(blacklight.top_s + 1)}
            tracemalloc.start()
            try:
                fresh = MemoryStore(max_keys=1 << 40)
                before = tracemalloc.get_traced_memory()[0]
                for i, batch in enumerate(distinct_batches):
                    await blacklight.observe(fresh, _client_id(i), batch, time.time())
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            client_state = per_client_memory / max(1, len(templates))  # rough: one small client key each
            index["memory_bytes_per_query"] = (after - before) / index_queries - client_state
            if redis_store is not None and redis_url is not None:
                await redis_store._redis.flushdb()
                before_redis = await _redis_used_memory(redis_url)
                for i, batch in enumerate(distinct_batches):
                    await blacklight.observe(redis_store, _client_id(i), batch, time.time())
                after_redis = await _redis_used_memory(redis_url)
                index["redis_bytes_per_query"] = (after_redis - before_redis) / index_queries
            report["blacklight_index"] = index
    finally:
        if redis_store is not None:
            await redis_store._redis.flushdb()
            await redis_store.close()
    return report


def benchmark_monitors(
    suite: MonitorSuite, x: np.ndarray, predicted: np.ndarray, **options: Any
) -> dict[str, Any]:
    """:func:`abenchmark_monitors` from synchronous code (``tfshield bench``)."""
    return asyncio.run(abenchmark_monitors(suite, x, predicted, **options))


def format_table(report: dict[str, Any]) -> str:
    """The benchmark as a plain-text table."""
    backends = list(report["backends"])
    names = list(report["backends"][backends[0]])
    lines = [
        f"monitor cost per single-sample request (median / p99 µs, after {report['warmup']} warm-up ones)",
        "",
        f"{'monitor':<16}" + "".join(f"{b + ' µs':>20}" for b in backends) + f"{'state B/client':>16}",
    ]
    for name in names:
        timings = [report["backends"][b][name] for b in backends]
        cells = "".join(f"{t['median_us']:>11.0f} / {t['p99_us']:<6.0f}" for t in timings)
        state = report["state_bytes"].get(name, {}).get("encoded", "")
        lines.append(f"{name:<16}{cells}{state:>16}")
    total = sum(report["backends"]["memory"][n]["median_us"] for n in names)
    lines.append(f"{'embedding':<16}{report['embedding_median_us']:>11.0f}")
    lines.append(f"{'all (memory)':<16}{total + report['embedding_median_us']:>11.0f}")
    budget = report["budget"]
    lines += [
        "",
        f"state per client: {budget['encoded_bytes_per_client']} B encoded; "
        f"{budget['memory_bytes_per_client']:.0f} B in the memory store"
        + (
            f", {budget['redis_bytes_per_client']:.0f} B in Redis"
            if "redis_bytes_per_client" in budget
            else ""
        ),
        f"{budget['clients']:,} clients: {budget['memory_total_bytes'] / 2**20:.0f} MiB in memory"
        + (
            f", {budget['redis_total_bytes'] / 2**20:.0f} MiB in Redis"
            if "redis_total_bytes" in budget
            else ""
        )
        + f" (budget {budget['budget_bytes'] / 2**20:.0f} MiB: "
        + ("fits" if budget["memory_fits"] else "DOES NOT FIT")
        + ")",
    ]
    if "blacklight_index" in report:
        index = report["blacklight_index"]
        lines.append(
            f"blacklight index (global): {index['keys_per_query']:.0f} keys and "
            f"{index['memory_bytes_per_query']:.0f} B per distinct query in memory"
            + (
                f", {index['redis_bytes_per_query']:.0f} B in Redis"
                if "redis_bytes_per_query" in index
                else ""
            )
            + "; bounded by ttl_s × distinct queries per second"
        )
    return "\n".join(lines)
