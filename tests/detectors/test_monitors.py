# ruff: noqa: F811  (test arguments named like the fixtures imported below)
"""The monitor contract, checked against every registered monitor on both stores.

Like ``test_contract.py`` for detectors: one suite parametrized over the
registry (monitors only) and over the store backends (memory, and a real
``redis-server``). Bounded cost is checked deterministically: the number of
store operations and keys per request, and the bytes of state per client,
must not grow with the number of past queries.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from detectors.base import REGISTRY, Detector, DetectorError
from detectors.blacklight import Blacklight
from detectors.embedding import Embedding
from detectors.monitor import Monitor, MonitorResult, QueryBatch, run_sync
from detectors.monitor_calibration import MonitorSuite, calibrate_monitors
from gateway.store import MemoryStore, Store
from tests.detectors.monitor_fixtures import SECRET, MonitorWorld, monitor_world, reencode_lightly
from tests.redis_fixtures import redis_server, redis_url, store_factory  # noqa: F401  (fixtures)

MONITORS = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, Monitor))


@pytest.fixture(scope="module")
def world() -> MonitorWorld:
    return monitor_world()


def monitor(world: MonitorWorld, name: str) -> Monitor:
    """A private copy of the calibrated monitor (its counters are per test)."""
    copied = copy.deepcopy(world.suite.monitors[name])
    copied.corrupt_states_total = 0
    return copied


def mixed_requests(world: MonitorWorld, n: int, seed: int = 0) -> list[QueryBatch]:
    """Digits, lightly re-encoded re-sends, near-duplicates and noise, in requests of 1–8 samples."""
    rng = np.random.default_rng(seed)
    pool = world.mnist.x_test
    queries = []
    while len(queries) < n:
        kind = rng.integers(4)
        digit = pool[rng.integers(len(pool))]
        if kind == 0:
            queries.append(digit)
        elif kind == 1:
            queries += [digit, reencode_lightly(digit, rng)]
        elif kind == 2:
            queries += [np.clip(digit + rng.normal(0, 0.02, digit.shape), 0, 1) for _ in range(3)]
        else:
            queries.append(rng.uniform(0, 1, digit.shape))
    x = np.stack(queries[:n]).astype(np.float32)
    sizes = rng.integers(1, 9, size=n)
    batches, start = [], 0
    for size in sizes:
        if start >= n:
            break
        batches += world.batches(x[start : start + size], batch_size=int(size))
        start += int(size)
    return batches


async def observe_all(
    m: Monitor, stores: Sequence[Store], client: str, batches: Iterable[QueryBatch]
) -> list:
    """Observe each request through the stores in turn (one replica per request)."""
    results = []
    for i, batch in enumerate(batches):
        results.append(await m.observe(stores[i % len(stores)], client, batch, now=1000.0 + i))
    return results


class CountingStore(Store):
    """A store that counts calls and keys per operation."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()

    async def get_many(self, keys):
        self.calls["get_many"] += 1
        self.keys["get_many"] += len(keys)
        return await self.inner.get_many(keys)

    async def set_many(self, items, ttl_s):
        items = list(items)
        self.calls["set_many"] += 1
        self.keys["set_many"] += len(items)
        return await self.inner.set_many(items, ttl_s)

    async def incr_many(self, keys, ttl_s):
        self.calls["incr_many"] += 1
        self.keys["incr_many"] += len(keys)
        return await self.inner.incr_many(keys, ttl_s)

    async def delete(self, keys):
        self.calls["delete"] += 1
        return await self.inner.delete(keys)

    async def zadd(self, key, member, score):
        self.calls["zadd"] += 1
        return await self.inner.zadd(key, member, score)

    async def ztop(self, key, limit, min_score=float("-inf")):
        self.calls["ztop"] += 1
        return await self.inner.ztop(key, limit, min_score)

    async def zrem(self, key, member):
        self.calls["zrem"] += 1
        return await self.inner.zrem(key, member)


async def state_bytes(m: Monitor, store: Store, client: str) -> int:
    return sum(len(v) for v in await store.get_many(m.client_keys(client)) if v is not None)


# -- the registry and hyperparameters ----------------------------------------------------


def test_every_monitor_is_registered():
    assert MONITORS == ["blacklight", "class_coverage", "knn", "ood_rate", "prada", "rate_limit"]


@pytest.mark.parametrize("name", MONITORS)
def test_hyperparameters_are_the_constructor_keywords_stored_as_given(name):
    cls = REGISTRY[name]
    keywords = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert list(cls.params) == keywords
    default = cls()
    assert cls(**default.get_params()).get_params() == default.get_params()
    json.dumps(default.get_params())


@pytest.mark.parametrize("name", MONITORS)
def test_a_monitor_declares_what_it_needs(name):
    cls = REGISTRY[name]
    assert cls.flags_when in ("above", "below")
    assert cls().max_state_bytes > 0
    assert {n: REGISTRY[n].needs_prediction for n in MONITORS} == {
        "blacklight": False,
        "class_coverage": True,
        "knn": False,
        "ood_rate": False,
        "prada": True,
        "rate_limit": False,
    }


# -- observing -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MONITORS)
async def test_observe_returns_a_verdict_with_a_risk_in_0_1(name, world, store_factory):
    m = monitor(world, name)
    results = await observe_all(m, [store_factory()], "alice", mixed_requests(world, 120))
    for result in results:
        assert isinstance(result, MonitorResult)
        assert result.monitor == name
        assert isinstance(result.flagged, bool)
        assert 0.0 <= result.risk <= 1.0
        assert isinstance(result.score, float)
        if result.flagged:
            assert result.risk > 0.5
    assert not any(r.rate_limited for r in results)


@pytest.mark.parametrize("name", MONITORS)
async def test_state_per_client_stays_within_max_state_bytes(name, world, store_factory):
    m = monitor(world, name)
    store = store_factory()
    sizes = []
    for chunk in range(3):
        await observe_all(m, [store], "alice", mixed_requests(world, 200, seed=chunk))
        sizes.append(await state_bytes(m, store, "alice"))
    assert 0 < sizes[0] <= m.max_state_bytes
    assert sizes[0] == sizes[1] == sizes[2], "the state must not grow with the number of queries"


@pytest.mark.parametrize("name", MONITORS)
async def test_store_operations_per_request_do_not_grow_with_history(name, world):
    m = monitor(world, name)
    store = CountingStore(MemoryStore())
    per_request: list[tuple[int, int, int]] = []
    for i, batch in enumerate(mixed_requests(world, 1200, seed=3)):
        before_calls, before_keys = sum(store.calls.values()), sum(store.keys.values())
        await m.observe(store, "alice", batch, now=1000.0 + i)
        calls = sum(store.calls.values()) - before_calls
        keys = sum(store.keys.values()) - before_keys
        per_request.append((len(batch.x), calls, keys))
    assert {calls for _, calls, _ in per_request} == {2}, "one read and one write per request"
    # Keys per sample are bounded by a constant: the client's key(s) plus, for Blacklight,
    # the fingerprint's hashes and the content digest of each sample.
    per_sample_bound = 2 * (m.top_s + 1) if isinstance(m, Blacklight) else 0
    for samples, _, keys in per_request:
        assert keys <= 2 * len(m.client_keys("alice")) + samples * per_sample_bound


@pytest.mark.parametrize("name", MONITORS)
async def test_reset_forgets_the_client(name, world, store_factory):
    m = monitor(world, name)
    store = store_factory()
    requests = mixed_requests(world, 150)
    await observe_all(m, [store], "alice", requests)
    await observe_all(m, [store], "bob", requests[:20])
    await m.reset(store, "alice")
    assert await store.get_many(m.client_keys("alice")) == [None] * len(m.client_keys("alice"))
    assert await state_bytes(m, store, "bob") > 0
    if not isinstance(m, Blacklight):  # Blacklight's index is shared by all clients and outlives a reset
        again = await observe_all(m, [store], "alice", requests[:30])
        fresh = await observe_all(m, [MemoryStore()], "alice", requests[:30])
        assert [r.score for r in again] == pytest.approx([r.score for r in fresh], nan_ok=True)


@pytest.mark.parametrize("name", MONITORS)
async def test_a_corrupt_state_is_a_new_client_and_is_counted(name, world, store_factory):
    m = monitor(world, name)
    store = store_factory()
    requests = mixed_requests(world, 40)
    await store.set_many([(m.key("alice"), b"\x80not a state at all")], ttl_s=60)
    corrupt = await observe_all(m, [store], "alice", requests)
    fresh = await observe_all(monitor(world, name), [MemoryStore()], "bob", requests)
    assert m.corrupt_states_total == 1
    if not isinstance(m, Blacklight):
        assert [r.score for r in corrupt] == pytest.approx([r.score for r in fresh], nan_ok=True)


@pytest.mark.parametrize("name", MONITORS)
async def test_two_replicas_see_one_client_as_one_client(name, world, store_factory):
    m = monitor(world, name)
    requests = mixed_requests(world, 160)
    alternating = await observe_all(m, [store_factory(), store_factory()], "alice", requests)
    await m.reset(store_factory(), "alice")
    single = await observe_all(monitor(world, name), [MemoryStore()], "alice", requests)
    assert [r.score for r in alternating] == pytest.approx([r.score for r in single], nan_ok=True)
    assert [r.flagged for r in alternating] == [r.flagged for r in single]


# -- calibration and artefacts -----------------------------------------------------------------


@pytest.mark.parametrize("name", MONITORS)
def test_save_then_load_observes_identically(name, world, tmp_path):
    m = monitor(world, name)
    m.save(tmp_path)
    loaded = Detector.load(tmp_path)
    assert type(loaded) is type(m)
    assert isinstance(loaded, Monitor)
    assert loaded.get_params() == m.get_params()
    assert loaded.threshold_ == m.threshold_
    if isinstance(loaded, Blacklight):
        loaded.set_secret(SECRET)
    requests = mixed_requests(world, 120)
    original = run_sync(observe_all(m, [MemoryStore()], "alice", requests))
    reloaded = run_sync(observe_all(loaded, [MemoryStore()], "alice", requests))
    assert [r.score for r in reloaded] == pytest.approx([r.score for r in original], nan_ok=True)


@pytest.mark.parametrize("name", [n for n in MONITORS if n != "rate_limit"])
def test_calibration_flags_at_most_fpr_of_the_benign_clients(name, world):
    from detectors.monitor import replay

    rng = np.random.default_rng(11)
    pool = world.mnist.x_validation
    clients = [world.batches(pool[rng.integers(0, len(pool), 80)]) for _ in range(10)]
    m = REGISTRY[name]().fit(world.mnist.x_train)
    m.calibrate_batches(clients, fpr=0.2)
    worst = replay(m, clients)
    flagged = worst > m.threshold_ if m.flags_when == "above" else worst < m.threshold_
    assert flagged.sum() <= 2
    assert m.target_fpr_ == 0.2


@pytest.mark.parametrize("name", MONITORS)
def test_an_uncalibrated_monitor_never_flags(name, world):
    m = REGISTRY[name]().fit(world.mnist.x_train)
    if name == "class_coverage":
        m.prior_ = np.full(10, 0.1)
    if name == "ood_rate":  # the per-query half of its calibration, without a client threshold
        m.query_threshold_, m.null_rate_ = 50.0, 0.01
    results = run_sync(observe_all(m, [MemoryStore()], "alice", mixed_requests(world, 80)))
    assert not any(r.flagged for r in results)
    assert all(r.risk == 0.0 for r in results)


@pytest.mark.parametrize("name", [n for n in MONITORS if REGISTRY[n].needs_prediction])
def test_monitors_that_need_predictions_say_so(name, world):
    m = monitor(world, name)
    batch = world.batches(world.mnist.x_test[:2])[0]
    without = QueryBatch(batch.x, batch.embedding, None)
    with pytest.raises(DetectorError, match="needs the predicted classes; run it after the response"):
        run_sync(m.observe(MemoryStore(), "alice", without, 0.0))


@pytest.mark.parametrize("name", [n for n in MONITORS if REGISTRY[n].needs_embedding])
def test_monitors_that_read_embeddings_check_their_width(name, world):
    m = monitor(world, name)
    batch = world.batches(world.mnist.x_test[:2])[0]
    narrow = QueryBatch(batch.x, batch.embedding[:, :3], batch.predicted)
    with pytest.raises(DetectorError, match="embedding columns"):
        run_sync(m.observe(MemoryStore(), "alice", narrow, 0.0))


def test_calibrate_monitors_rejects_an_unknown_name_listing_the_monitors(world):
    with pytest.raises(DetectorError) as raised:
        calibrate_monitors(
            world.mnist.x_train[:50], [world.mnist.x_test[:20]], 0.1, world.predicted, names=["oracle"]
        )
    assert str(raised.value) == f"unknown monitor(s) oracle; known: {', '.join(MONITORS)}"


def test_a_monitor_suite_saves_and_loads_with_its_embedding(world, tmp_path):
    world.suite.save(tmp_path)
    loaded = MonitorSuite.load(tmp_path)
    assert list(loaded.monitors) == list(world.suite.monitors)
    assert loaded.embedding.fingerprint() == world.suite.embedding.fingerprint()
    for name, m in loaded.monitors.items():
        assert m.threshold_ == world.suite.monitors[name].threshold_
    assert "salt" not in (tmp_path / "blacklight" / "detector.json").read_text()


def test_a_monitor_suite_refuses_another_embedding(world, tmp_path):
    world.suite.save(tmp_path)
    Embedding(method="random").fit(world.mnist.x_train[:100]).save(tmp_path / "embedding")
    with pytest.raises(Exception, match="not the embedding the monitors were calibrated with"):
        MonitorSuite.load(tmp_path)


@pytest.mark.parametrize("name", MONITORS)
def test_an_empty_request_is_observed_without_error(name, world):
    m = monitor(world, name)
    batch = QueryBatch(
        np.zeros((0, 784), np.float32),
        np.zeros((0, world.embedding.dims), np.float32),
        np.zeros(0, np.int64),
    )
    result = run_sync(m.observe(MemoryStore(), "alice", batch, 0.0))
    assert not result.flagged
