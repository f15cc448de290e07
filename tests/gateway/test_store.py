# ruff: noqa: F811  (test arguments named like the fixtures imported below)
"""The state store: one contract, two backends (memory and a real redis-server).

Every contract test runs on both (``store_factory`` from ``tests.redis_fixtures``);
backend-specific behaviour (LRU eviction, a fake clock, an unreachable Redis)
has its own tests.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.store import MemoryStore, RedisStore, StoreError
from tests.redis_fixtures import redis_server, redis_url, store_factory  # noqa: F401  (fixtures)


async def test_get_many_returns_values_in_key_order_and_none_for_missing(store_factory):
    store = store_factory()
    await store.set_many([("a", b"1"), ("b", b"\x00\xff")], ttl_s=60)
    assert await store.get_many(["b", "missing", "a"]) == [b"\x00\xff", None, b"1"]
    assert await store.get_many([]) == []


async def test_set_many_overwrites(store_factory):
    store = store_factory()
    await store.set_many([("k", b"old")], ttl_s=60)
    await store.set_many([("k", b"new")], ttl_s=60)
    assert await store.get_many(["k"]) == [b"new"]


async def test_values_expire_after_their_ttl(store_factory):
    store = store_factory()
    await store.set_many([("short", b"x")], ttl_s=0.05)
    await store.set_many([("long", b"y")], ttl_s=60)
    await asyncio.sleep(0.15)
    assert await store.get_many(["short", "long"]) == [None, b"y"]


async def test_incr_many_counts_from_zero_and_returns_values_after(store_factory):
    store = store_factory()
    assert await store.incr_many(["c1", "c2"], ttl_s=60) == [1, 1]
    assert await store.incr_many(["c1"], ttl_s=60) == [2]
    assert await store.incr_many(["c1", "c1"], ttl_s=60) == [3, 4]
    assert await store.incr_many([], ttl_s=60) == []


async def test_counters_expire(store_factory):
    store = store_factory()
    await store.incr_many(["c"], ttl_s=0.05)
    await asyncio.sleep(0.15)
    assert await store.incr_many(["c"], ttl_s=60) == [1]


async def test_delete_reports_how_many_existed(store_factory):
    store = store_factory()
    await store.set_many([("a", b"1"), ("b", b"2")], ttl_s=60)
    assert await store.delete(["a", "b", "never"]) == 2
    assert await store.get_many(["a", "b"]) == [None, None]
    assert await store.delete([]) == 0


async def test_ztop_lists_highest_scores_first_above_a_floor(store_factory):
    store = store_factory()
    for member, score in [("low", 0.1), ("high", 0.9), ("mid", 0.5), ("neg", -3.0)]:
        await store.zadd("z", member, score)
    assert await store.ztop("z", 10) == [("high", 0.9), ("mid", 0.5), ("low", 0.1), ("neg", -3.0)]
    assert await store.ztop("z", 2) == [("high", 0.9), ("mid", 0.5)]
    assert await store.ztop("z", 10, min_score=0.5) == [("high", 0.9), ("mid", 0.5)]
    assert await store.ztop("empty", 10) == []


async def test_zadd_updates_a_member_and_zrem_removes_it(store_factory):
    store = store_factory()
    await store.zadd("z", "m", 1.0)
    await store.zadd("z", "m", 2.0)
    await store.zadd("z", "other", 1.5)
    assert await store.ztop("z", 10) == [("m", 2.0), ("other", 1.5)]
    await store.zrem("z", "m")
    await store.zrem("z", "never")
    assert await store.ztop("z", 10) == [("other", 1.5)]


async def test_binary_keys_and_values_round_trip(store_factory):
    store = store_factory()
    value = bytes(range(256))
    await store.set_many([("tfs:m:client ü/1", value)], ttl_s=60)
    assert await store.get_many(["tfs:m:client ü/1"]) == [value]


async def test_two_replicas_see_one_client_as_one_client(store_factory):
    """What one gateway replica writes, another reads and updates (Redis: separate connections)."""
    replica_a, replica_b = store_factory(), store_factory()
    await replica_a.set_many([("tfs:m:alice", b"state-1")], ttl_s=60)
    assert await replica_b.get_many(["tfs:m:alice"]) == [b"state-1"]
    assert await replica_a.incr_many(["tfs:m:g:h"], ttl_s=60) == [1]
    assert await replica_b.incr_many(["tfs:m:g:h"], ttl_s=60) == [2]
    await replica_b.zadd("tfs:risk", "alice", 0.7)
    assert await replica_a.ztop("tfs:risk", 5) == [("alice", 0.7)]


async def test_ping_succeeds_on_a_live_store(store_factory):
    await store_factory().ping()


# -- memory backend ------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_memory_store_expires_by_its_clock():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.set_many([("k", b"v")], ttl_s=10)
    clock.now += 9.9
    assert await store.get_many(["k"]) == [b"v"]
    clock.now += 0.2
    assert await store.get_many(["k"]) == [None]
    assert len(store) == 0


async def test_memory_store_evicts_least_recently_used_keys_beyond_max_keys():
    store = MemoryStore(max_keys=3)
    await store.set_many([("a", b"1"), ("b", b"2"), ("c", b"3")], ttl_s=60)
    await store.get_many(["a"])  # a is now the most recently used
    await store.set_many([("d", b"4")], ttl_s=60)
    assert await store.get_many(["a", "b", "c", "d"]) == [b"1", None, b"3", b"4"]
    assert len(store) == 3


async def test_memory_store_bounds_each_sorted_set_dropping_the_lowest():
    store = MemoryStore(max_keys=2)
    for member, score in [("a", 1.0), ("b", 3.0), ("c", 2.0)]:
        await store.zadd("z", member, score)
    assert await store.ztop("z", 10) == [("b", 3.0), ("c", 2.0)]


# -- redis backend -------------------------------------------------------------------------


async def test_redis_store_keeps_only_the_highest_max_zset_members(redis_url):
    store = RedisStore(redis_url, timeout_s=1.0, max_zset_members=2)
    try:
        for member, score in [("a", 1.0), ("b", 3.0), ("c", 2.0)]:
            await store.zadd("z", member, score)
        assert await store.ztop("z", 10) == [("b", 3.0), ("c", 2.0)]
    finally:
        await store.close()


@pytest.mark.parametrize("operation", ["get_many", "set_many", "incr_many", "zadd", "ping"])
async def test_an_unreachable_redis_raises_store_error_within_its_timeout(tmp_path, operation):
    store = RedisStore(f"unix://{tmp_path / 'nobody-listens.sock'}", timeout_s=0.05)
    calls = {
        "get_many": lambda: store.get_many(["k"]),
        "set_many": lambda: store.set_many([("k", b"v")], ttl_s=1),
        "incr_many": lambda: store.incr_many(["k"], ttl_s=1),
        "zadd": lambda: store.zadd("z", "m", 1.0),
        "ping": lambda: store.ping(),
    }
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"^redis: "):
        await calls[operation]()
    assert time.monotonic() - started < 1.0
    await store.close()


async def test_a_redis_that_stops_answering_raises_store_error_not_a_hang(tmp_path):
    """A server that accepts the connection but never replies: the socket timeout fires."""
    path = tmp_path / "silent.sock"
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(1 << 16)  # read the command, never answer

    server = await asyncio.start_unix_server(swallow, path=str(path))
    store = RedisStore(f"unix://{path}", timeout_s=0.1)
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match=r"^redis: "):
            await store.get_many(["k"])
        assert time.monotonic() - started < 2.0
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
        await store.close()
