"""State store for the per-client monitors: in memory, or Redis for many replicas.

Monitors keep bounded state per client (DESIGN.md, decision 5). Several
gateway replicas must see one client as one client, so that state lives behind
this interface, with two backends:

- :class:`MemoryStore` (default): a dict with expiry, bounded by
  ``max_keys`` (least recently used keys are evicted first);
- :class:`RedisStore`: one Redis (or a cluster/sentinel endpoint) shared by
  every replica, through ``redis.asyncio``.

The operations are the few the monitors need, each a single round trip:

- ``get_many(keys)`` / ``set_many(items, ttl_s)``: per-client state blobs
  (read at the start of a query, written back after it). Two replicas that
  update the same client at the same instant may lose one update (last
  writer wins): monitors are statistical, and an attacker who alternates
  between replicas query by query is still seen in full.
- ``incr_many(keys, ttl_s)``: counters with expiry (the fingerprint index);
  returns the values after the increment.
- ``zadd`` / ``ztop`` / ``zrem``: one sorted set of clients by risk
  (``ListClients``).
- ``delete(keys)``.

Every failure raises :class:`StoreError`; the caller applies the configured
failure policy (DESIGN.md, decision 6) and counts it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from gateway.errors import TfshieldError


class StoreError(TfshieldError):
    """The store could not be reached or answered with an error."""


class Store(ABC):
    backend: str = ""

    @abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys``, None for missing or expired ones."""

    @abstractmethod
    async def set_many(self, items: Iterable[tuple[str, bytes]], ttl_s: float) -> None:
        """Set each key to its value, expiring ``ttl_s`` seconds from now."""

    @abstractmethod
    async def incr_many(self, keys: Sequence[str], ttl_s: float) -> list[int]:
        """Increment each counter (created at 0), refresh its expiry; values after."""

    @abstractmethod
    async def delete(self, keys: Sequence[str]) -> int:
        """Delete keys; returns how many existed."""

    @abstractmethod
    async def zadd(self, key: str, member: str, score: float) -> None:
        """Set ``member``'s score in the sorted set ``key``."""

    @abstractmethod
    async def ztop(self, key: str, limit: int, min_score: float = float("-inf")) -> list[tuple[str, float]]:
        """Up to ``limit`` members with the highest scores >= ``min_score``, highest first."""

    @abstractmethod
    async def zrem(self, key: str, member: str) -> None:
        """Remove ``member`` from the sorted set ``key``."""

    async def zcard(self, key: str) -> int:
        """How many members the sorted set ``key`` has (backends answer without listing them)."""
        return len(await self.ztop(key, 2**31 - 1))

    async def ping(self) -> None:  # noqa: B027 (optional hook: the memory store always answers)
        """Raise StoreError unless the store answers."""

    async def close(self) -> None:
        return None


class MemoryStore(Store):
    """Process-local store: expiry on read, LRU eviction beyond ``max_keys``.

    Sorted sets are bounded by ``max_keys`` members each too (lowest scores
    are dropped), so no client population can grow it without limit.
    """

    backend = "memory"

    def __init__(self, max_keys: int = 1_000_000, clock=time.monotonic) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes | int]] = OrderedDict()
        self._zsets: dict[str, dict[str, float]] = {}

    def _get(self, key: str) -> bytes | int | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def _put(self, key: str, value: bytes | int, ttl_s: float) -> None:
        self._data[key] = (self._clock() + ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_keys:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        # The per-key path of _get, inlined with one clock reading: monitors read
        # dozens of keys per query (Blacklight: top_s + 2), so this loop is hot.
        now = self._clock()
        data = self._data
        out: list[bytes | None] = []
        for key in keys:
            entry = data.get(key)
            if entry is None:
                out.append(None)
            elif entry[0] <= now:
                del data[key]
                out.append(None)
            else:
                data.move_to_end(key)
                value = entry[1]
                out.append(value if isinstance(value, bytes) else None)
        return out

    async def set_many(self, items: Iterable[tuple[str, bytes]], ttl_s: float) -> None:
        expires = self._clock() + ttl_s
        data = self._data
        for key, value in items:
            data[key] = (expires, value)
            data.move_to_end(key)
        while len(data) > self.max_keys:
            data.popitem(last=False)

    async def incr_many(self, keys: Sequence[str], ttl_s: float) -> list[int]:
        out = []
        for key in keys:
            current = self._get(key)
            value = (current if isinstance(current, int) else 0) + 1
            self._put(key, value, ttl_s)
            out.append(value)
        return out

    async def delete(self, keys: Sequence[str]) -> int:
        existed = 0
        for key in keys:
            if self._get(key) is not None:
                existed += 1
            self._data.pop(key, None)
            self._zsets.pop(key, None)
        return existed

    async def zadd(self, key: str, member: str, score: float) -> None:
        zset = self._zsets.setdefault(key, {})
        zset[member] = score
        if len(zset) > self.max_keys:
            del zset[min(zset, key=zset.__getitem__)]

    async def ztop(self, key: str, limit: int, min_score: float = float("-inf")) -> list[tuple[str, float]]:
        zset = self._zsets.get(key, {})
        ranked = sorted(((m, s) for m, s in zset.items() if s >= min_score), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:limit]

    async def zrem(self, key: str, member: str) -> None:
        self._zsets.get(key, {}).pop(member, None)

    async def zcard(self, key: str) -> int:
        return len(self._zsets.get(key, {}))


class RedisStore(Store):
    """Redis backend (``redis.asyncio``); every operation is one pipelined round trip."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.05,
        max_zset_members: int = 1_000_000,
        password: str | None = None,
    ) -> None:
        try:
            import redis.asyncio as redis_asyncio
        except ImportError:  # pragma: no cover - depends on the install
            raise StoreError(
                "the redis store needs the 'redis' package: pip install 'tfshield[redis]'"
            ) from None
        self._errors = (redis_asyncio.RedisError, OSError, TimeoutError)
        self.max_zset_members = max_zset_members
        self._redis = redis_asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            **({"password": password} if password else {}),
        )

    async def _run(self, build):
        try:
            pipe = self._redis.pipeline(transaction=False)
            build(pipe)
            return await pipe.execute()
        except self._errors as exc:
            raise StoreError(f"redis: {type(exc).__name__}: {exc}") from None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        (values,) = await self._run(lambda p: p.mget(list(keys)))
        return list(values)

    async def set_many(self, items: Iterable[tuple[str, bytes]], ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))

        def build(pipe) -> None:
            for key, value in items:
                pipe.set(key, value, px=ttl_ms)

        await self._run(build)

    async def incr_many(self, keys: Sequence[str], ttl_s: float) -> list[int]:
        if not keys:
            return []
        ttl_ms = max(1, int(ttl_s * 1000))

        def build(pipe) -> None:
            for key in keys:
                pipe.incr(key)
                pipe.pexpire(key, ttl_ms)

        results = await self._run(build)
        return [int(v) for v in results[0::2]]

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        (count,) = await self._run(lambda p: p.delete(*keys))
        return int(count)

    async def zadd(self, key: str, member: str, score: float) -> None:
        def build(pipe) -> None:
            pipe.zadd(key, {member: score})
            # Keep the highest max_zset_members: drop the lowest ranks beyond it.
            pipe.zremrangebyrank(key, 0, -self.max_zset_members - 1)

        await self._run(build)

    async def ztop(self, key: str, limit: int, min_score: float = float("-inf")) -> list[tuple[str, float]]:
        low = "-inf" if min_score == float("-inf") else min_score
        (rows,) = await self._run(
            lambda p: p.zrevrangebyscore(key, "+inf", low, start=0, num=limit, withscores=True)
        )
        return [(m.decode() if isinstance(m, bytes) else m, float(s)) for m, s in rows]

    async def zrem(self, key: str, member: str) -> None:
        await self._run(lambda p: p.zrem(key, member))

    async def zcard(self, key: str) -> int:
        (count,) = await self._run(lambda p: p.zcard(key))
        return int(count)

    async def ping(self) -> None:
        await self._run(lambda p: p.ping())

    async def close(self) -> None:
        await self._redis.aclose()
