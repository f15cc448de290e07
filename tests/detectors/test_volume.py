"""Rate limit (token bucket, RESOURCE_EXHAUSTED, never a flag) and class coverage (KL to the prior)."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import DetectorError
from detectors.monitor import QueryBatch
from detectors.volume import ClassCoverage, RateLimit
from gateway.store import MemoryStore


def samples(n: int, predicted=None) -> QueryBatch:
    return QueryBatch(np.zeros((n, 4), np.float32), np.zeros((n, 0), np.float32), predicted)


async def test_a_burst_is_allowed_then_requests_are_rate_limited():
    m = RateLimit(rate_per_s=10.0, burst=20.0)
    store = MemoryStore()
    assert not (await m.observe(store, "c", samples(15), now=0.0)).rate_limited
    limited = await m.observe(store, "c", samples(10), now=0.0)
    assert limited.rate_limited
    assert (limited.flagged, limited.risk) == (False, 0.0)
    assert limited.score == pytest.approx(5.0)  # a refused request costs nothing


async def test_tokens_refill_at_the_rate_up_to_the_burst():
    m = RateLimit(rate_per_s=10.0, burst=20.0)
    store = MemoryStore()
    await m.observe(store, "c", samples(20), now=0.0)
    assert (await m.observe(store, "c", samples(10), now=0.5)).rate_limited
    assert not (await m.observe(store, "c", samples(10), now=1.0)).rate_limited
    assert (await m.observe(store, "c", samples(1), now=100.0)).score == pytest.approx(19.0)


async def test_clients_have_separate_buckets():
    m = RateLimit(rate_per_s=1.0, burst=5.0)
    store = MemoryStore()
    await m.observe(store, "a", samples(5), now=0.0)
    assert (await m.observe(store, "a", samples(1), now=0.0)).rate_limited
    assert not (await m.observe(store, "b", samples(1), now=0.0)).rate_limited


def coverage(prior=None) -> ClassCoverage:
    m = ClassCoverage(n_classes=4, prior_weight=20.0).fit(np.zeros((2, 1)))
    m.prior_ = np.asarray(prior if prior is not None else [0.25] * 4)
    m.threshold_ = 0.3
    m.target_fpr_ = 0.01
    return m


async def test_coverage_like_the_prior_scores_near_zero():
    m = coverage()
    result = await m.observe(MemoryStore(), "c", samples(400, np.tile(np.arange(4), 100)), now=0.0)
    assert result.score == pytest.approx(0.0, abs=1e-9)
    assert not result.flagged


async def test_one_class_only_scores_high_and_is_flagged():
    m = coverage()
    result = await m.observe(MemoryStore(), "c", samples(200, np.zeros(200, int)), now=0.0)
    p = np.array([200 + 5, 5, 5, 5]) / 220
    assert result.score == pytest.approx(float(np.sum(p * np.log(p / 0.25))))
    assert result.flagged


async def test_a_few_queries_stay_near_the_prior_thanks_to_the_smoothing():
    m = coverage()
    result = await m.observe(MemoryStore(), "c", samples(3, np.zeros(3, int)), now=0.0)
    assert result.score < 0.1


async def test_more_benign_queries_never_raise_the_divergence():
    """Volume alone: a client whose mix matches the prior only gets closer to it."""
    m = coverage()
    store = MemoryStore()
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(20):
        scores.append((await m.observe(store, "c", samples(100, rng.integers(0, 4, 100)), now=0.0)).score)
    assert max(scores[10:]) < 0.05


async def test_counts_decay_with_their_half_life():
    m = coverage()
    m.half_life_s = 10.0
    store = MemoryStore()
    await m.observe(store, "c", samples(100, np.zeros(100, int)), now=0.0)
    await m.observe(store, "c", samples(1, np.array([1])), now=10.0)
    counts = m._decode((await store.get_many([m.key("c")]))[0])["counts"]
    np.testing.assert_allclose(counts, [50, 1, 0, 0])


def test_calibration_learns_the_prior_from_benign_predictions():
    m = ClassCoverage(n_classes=3).fit(np.zeros((2, 1)))
    clients = [[samples(10, np.array([0] * 6 + [1] * 3 + [2]))] for _ in range(20)]
    m.calibrate_batches(clients, fpr=0.1)
    np.testing.assert_allclose(m.prior_, (np.array([120, 60, 20]) + 1) / 203)


def test_bad_settings_are_refused():
    with pytest.raises(DetectorError, match="rate_per_s must be > 0"):
        RateLimit(rate_per_s=0)
    with pytest.raises(DetectorError, match="n_classes must be an integer >= 2"):
        ClassCoverage(n_classes=1)
