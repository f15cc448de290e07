# ruff: noqa: F811  (test arguments named like the fixtures imported below)
"""Blacklight: fingerprints, the shared index, attribution to the querying client, expiry, the secret."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import DetectorError
from detectors.blacklight import Blacklight
from detectors.monitor import QueryBatch, run_sync
from detectors.monitor_calibration import jpeg_like
from gateway.store import MemoryStore
from tests.redis_fixtures import redis_server, redis_url, store_factory  # noqa: F401  (fixtures)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def digits(mnist) -> np.ndarray:
    return mnist.x_test[:200]


@pytest.fixture(scope="module")
def blacklight(mnist) -> Blacklight:
    m = Blacklight().fit(mnist.x_train[:100]).set_secret("test-secret")
    m.threshold_ = 5.0
    m.target_fpr_ = 0.01
    return m


def batch(x: np.ndarray) -> QueryBatch:
    x = np.asarray(x, dtype=np.float32)
    x = x[None] if x.ndim == 3 else x
    return QueryBatch(x.reshape(len(x), -1), np.zeros((len(x), 0), np.float32))


def shared(a: np.ndarray, b: np.ndarray) -> int:
    return len(np.intersect1d(a, b))


def nudge(digit: np.ndarray, rng: np.random.Generator, sigma: float = 2 / 255) -> np.ndarray:
    return np.clip(digit + rng.normal(0, sigma, digit.shape), 0, 1).astype(np.float32)


# -- fingerprints ---------------------------------------------------------------------------------


def test_a_fingerprint_is_top_s_sorted_distinct_hashes(blacklight, digits):
    (fingerprint,) = blacklight.fingerprints(batch(digits[0]).x)
    assert fingerprint.dtype == np.uint64
    assert len(fingerprint) == blacklight.top_s
    assert np.all(np.diff(fingerprint.astype(np.float64)) > 0)


def test_distinct_digits_share_far_fewer_hashes_than_the_match_threshold(blacklight, digits):
    prints = blacklight.fingerprints(batch(digits).x)
    pairs = [shared(prints[i], prints[j]) for i in range(len(prints)) for j in range(i)]
    assert max(pairs) < blacklight.match_threshold * 0.75


@pytest.mark.parametrize(
    "reencode",
    [
        pytest.param(lambda d, rng: np.rint(d * 255) / 255, id="uint8-round-trip"),
        pytest.param(lambda d, rng: nudge(d, rng, 1 / 255), id="noise-1-grey-level"),
        pytest.param(lambda d, rng: jpeg_like(d, 95), id="jpeg-95"),
    ],
)
def test_a_light_re_encoding_is_a_near_duplicate(blacklight, digits, reencode):
    rng = np.random.default_rng(0)
    originals = blacklight.fingerprints(batch(digits[:50]).x)
    copies = blacklight.fingerprints(batch(np.stack([reencode(d, rng) for d in digits[:50]])).x)
    matches = [shared(a, b) for a, b in zip(originals, copies, strict=True)]
    assert np.median(matches) >= blacklight.match_threshold


def test_the_secret_decides_the_hashes_and_replicas_with_one_secret_agree(mnist, digits):
    a = Blacklight().fit(mnist.x_train[:100]).set_secret("one")
    b = Blacklight().fit(mnist.x_train[:100]).set_secret("one")
    c = Blacklight().fit(mnist.x_train[:100]).set_secret("two")
    x = batch(digits[:3]).x
    for fa, fb, fc in zip(a.fingerprints(x), b.fingerprints(x), c.fingerprints(x), strict=True):
        np.testing.assert_array_equal(fa, fb)
        assert shared(fa, fc) < 10
    assert list(a.digests(x)) == list(b.digests(x)) != list(c.digests(x))


def test_an_empty_secret_is_refused(blacklight):
    with pytest.raises(DetectorError, match="the secret must not be empty"):
        Blacklight().set_secret("")


def test_inputs_of_another_shape_are_refused(blacklight):
    with pytest.raises(DetectorError, match=r"samples have shape \[100\], fitted on \[28, 28, 1\]"):
        blacklight.fingerprints(np.zeros((1, 100), np.float32))


def test_flat_inputs_use_one_dimensional_windows(mnist):
    m = Blacklight(patch=3).fit(mnist.x_train[:50].reshape(50, -1)).set_secret("s")
    (fingerprint,) = m.fingerprints(mnist.x_test[:1].reshape(1, -1))
    assert len(fingerprint) == m.top_s


# -- the shared index -------------------------------------------------------------------------------


async def test_a_near_duplicate_of_another_clients_query_is_attributed_to_the_sender(
    blacklight, digits, store_factory
):
    store = store_factory()
    rng = np.random.default_rng(1)
    alice = await blacklight.observe(store, "alice", batch(digits[0]), now=1.0)
    bob = await blacklight.observe(store, "bob", batch(nudge(digits[0], rng)), now=2.0)
    assert (alice.score, bob.score) == (0.0, 1.0)
    again = await blacklight.observe(store, "alice", batch(digits[1]), now=3.0)
    assert again.score == 0.0


async def test_replicas_share_one_index(blacklight, digits, store_factory):
    replica_a, replica_b = store_factory(), store_factory()
    rng = np.random.default_rng(2)
    await blacklight.observe(replica_a, "alice", batch(digits[0]), now=1.0)
    result = await blacklight.observe(replica_b, "bob", batch(nudge(digits[0], rng)), now=2.0)
    assert result.score == 1.0


async def test_an_exact_re_send_is_never_a_hit_whoever_sent_the_original(blacklight, digits, store_factory):
    store = store_factory()
    for client in ("alice", "bob", "carol", "alice"):
        result = await blacklight.observe(store, client, batch(digits[0]), now=1.0)
        assert result.score == 0.0
    # A float -> uint8 -> float round trip of 8-bit data is the same image.
    result = await blacklight.observe(store, "dave", batch(np.rint(digits[0] * 255) / 255), now=2.0)
    assert result.score == 0.0


async def test_a_walk_of_near_duplicates_counts_hits_in_one_cluster(blacklight, digits, store_factory):
    store = store_factory()
    rng = np.random.default_rng(3)
    current = digits[5]
    scores = []
    for i in range(12):
        current = nudge(current, rng, 3 / 255)
        scores.append((await blacklight.observe(store, "mallory", batch(current), now=float(i))).score)
    assert scores[0] == 0.0
    assert scores[-1] == pytest.approx(11.0, abs=0.1)  # every later step is a hit in the first one's cluster
    assert scores == sorted(scores)


async def test_re_sending_many_digits_a_few_times_does_not_add_up(blacklight, digits, store_factory):
    """The score is the busiest cluster, not the number of hits: volume alone does not raise it."""
    store = store_factory()
    rng = np.random.default_rng(4)
    result = None
    for i, digit in enumerate(digits[:40]):
        for copy in (digit, nudge(digit, rng), nudge(digit, rng)):
            result = await blacklight.observe(store, "bob", batch(copy), now=float(i))
    assert result is not None and result.score <= 2.0 + 1e-6
    assert not result.flagged


async def test_a_batch_is_matched_within_itself(blacklight, digits, store_factory):
    rng = np.random.default_rng(5)
    probes = np.stack([nudge(digits[7], rng) for _ in range(8)])
    result = await blacklight.observe(store_factory(), "mallory", batch(probes), now=1.0)
    assert result.score == pytest.approx(7.0)
    assert result.flagged


def test_the_index_forgets_queries_after_its_ttl(mnist, digits):
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    m = Blacklight(ttl_s=60.0).fit(mnist.x_train[:100]).set_secret("s")
    rng = np.random.default_rng(6)
    run_sync(m.observe(store, "alice", batch(digits[0]), now=clock.now))
    clock.now += 59.0
    assert run_sync(m.observe(store, "bob", batch(nudge(digits[0], rng)), now=clock.now)).score == 1.0
    clock.now += 120.0  # both queries are now older than the TTL
    assert run_sync(m.observe(store, "carol", batch(nudge(digits[0], rng)), now=clock.now)).score == 0.0
    assert len(store) <= 2 * (m.top_s + 1) + 1  # only carol's query (and her state) remain


async def test_hit_counts_decay_with_their_half_life(mnist, digits):
    m = Blacklight(half_life_s=10.0).fit(mnist.x_train[:100]).set_secret("s")
    store = MemoryStore()
    rng = np.random.default_rng(7)
    await m.observe(store, "mallory", batch(digits[0]), now=0.0)
    for _ in range(4):
        await m.observe(store, "mallory", batch(nudge(digits[0], rng)), now=0.0)
    later = await m.observe(store, "mallory", batch(digits[1]), now=10.0)
    assert later.score == pytest.approx(2.0, rel=1e-3)


async def test_a_client_tracks_a_bounded_number_of_clusters(mnist, digits):
    m = Blacklight(max_clusters=2).fit(mnist.x_train[:100]).set_secret("s")
    store = MemoryStore()
    rng = np.random.default_rng(8)
    for digit in digits[:6]:
        await m.observe(store, "bob", batch(digit), now=0.0)
        await m.observe(store, "bob", batch(nudge(digit, rng)), now=0.0)
    (blob,) = await store.get_many([m.key("bob")])
    assert len(blob) <= m.max_state_bytes
    assert m._decode(blob)["ids"].shape == (2,)
