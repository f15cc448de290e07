"""The off-distribution rate monitor: its statistic, its memory and its calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detectors.base import Detector
from detectors.monitor import run_sync
from detectors.ood_rate import OodRate, rate_surprise
from gateway.store import MemoryStore
from tests.detectors.monitor_fixtures import MonitorWorld, monitor_world


@pytest.fixture(scope="module")
def world() -> MonitorWorld:
    return monitor_world()


def bernoulli_kl(q: float, p: float) -> float:
    total = 0.0
    for a, b in ((q, p), (1 - q, 1 - p)):
        if a > 0:
            total += a * math.log(a / b)
    return total


@pytest.mark.parametrize(("n", "k", "p0"), [(10, 5, 0.01), (100, 3, 0.02), (40, 40, 0.003), (7, 1, 0.1)])
def test_surprise_is_n_times_the_bernoulli_divergence_above_the_benign_rate(n, k, p0):
    assert rate_surprise(n, k, p0) == pytest.approx(n * bernoulli_kl(k / n, p0), rel=1e-12)


def test_surprise_is_zero_at_or_below_the_benign_rate_and_grows_with_off_queries():
    assert rate_surprise(100, 1, 0.01) == 0.0
    assert rate_surprise(100, 0, 0.01) == 0.0
    assert rate_surprise(0, 0, 0.01) == 0.0
    values = [rate_surprise(100, k, 0.01) for k in range(2, 30)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    # The same rate over more queries is more evidence.
    assert rate_surprise(400, 40, 0.01) == pytest.approx(4 * rate_surprise(100, 10, 0.01))


def test_calibration_counts_about_query_fpr_of_benign_queries_as_off(world):
    m = world.suite.monitors["ood_rate"]
    assert isinstance(m, OodRate)
    assert 0.0 < m.null_rate_ <= m.query_fpr
    scores = m.query_scores(world.mnist.x_test.reshape(len(world.mnist.x_test), -1))
    # Held-out digits: within 4 binomial standard deviations of the calibrated rate.
    sd = math.sqrt(m.null_rate_ * (1 - m.null_rate_) / len(scores))
    assert np.mean(scores > m.query_threshold_) <= m.null_rate_ + 4 * sd
    noise = np.random.default_rng(0).uniform(0, 1, (50, 784)).astype(np.float32)
    assert np.all(m.query_scores(noise) > m.query_threshold_)


async def test_a_flagged_client_fades_back_after_it_stops(world):
    m = world.suite.monitors["ood_rate"]
    store = MemoryStore()
    noise = np.random.default_rng(1).uniform(0, 1, (20, 28, 28, 1)).astype(np.float32)
    result = None
    for i, batch in enumerate(world.batches(noise)):
        result = await m.observe(store, "mallory", batch, now=float(i))
    assert result is not None and result.flagged
    (digit,) = world.batches(world.mnist.x_test[:1])
    later = await m.observe(store, "mallory", digit, now=20.0 + 20 * m.half_life_s)
    assert not later.flagged
    assert later.score < result.score / 100


async def test_state_is_two_counts_and_a_time_whatever_the_volume(world):
    m = world.suite.monitors["ood_rate"]
    store = MemoryStore()
    digits = world.mnist.x_test[:64]
    for i, batch in enumerate(world.batches(digits, batch_size=8)):
        await m.observe(store, "alice", batch, now=float(i))
    (blob,) = await store.get_many([m.key("alice")])
    assert blob is not None and len(blob) <= m.max_state_bytes
    state = m._decode(blob)
    assert state is not None and state["counts"][0] == pytest.approx(64.0, rel=1e-2)  # decayed a little


def test_a_saved_monitor_reloads_with_the_same_query_threshold(world, tmp_path):
    m = world.suite.monitors["ood_rate"]
    loaded = Detector.load(m.save(tmp_path / "ood_rate"))
    assert isinstance(loaded, OodRate)
    assert (loaded.query_threshold_, loaded.null_rate_, loaded.threshold_) == (
        m.query_threshold_,
        m.null_rate_,
        m.threshold_,
    )
    x = world.mnist.x_test[:32].reshape(32, -1)
    np.testing.assert_array_equal(loaded.query_scores(x), m.query_scores(x))
    assert run_sync(loaded.observe(MemoryStore(), "a", world.batches(x[:4], 4)[0], 0.0)) == run_sync(
        m.observe(MemoryStore(), "a", world.batches(x[:4], 4)[0], 0.0)
    )


def test_a_replay_too_short_to_show_off_queries_still_gets_the_chernoff_floor(world):
    m = OodRate().fit(world.mnist.x_train)
    # Five benign clients of ten ordinary digits each: no off query to learn a threshold from.
    sequences = [world.batches(world.mnist.x_validation[i * 10 : (i + 1) * 10]) for i in range(5)]
    m.calibrate_batches(sequences, 0.05)
    assert m.threshold_ == pytest.approx(math.log(1 / 0.05))
    # One odd input among digits does not flag a client; a run of them does.
    store = MemoryStore()
    noise = np.random.default_rng(3).uniform(0, 1, (1, 28, 28, 1)).astype(np.float32)
    (odd,) = world.batches(noise)
    assert not run_sync(m.observe(store, "alice", odd, 0.0)).flagged
    for i, batch in enumerate(world.batches(world.mnist.x_test[:20])):
        assert not run_sync(m.observe(store, "alice", batch, 1.0 + i)).flagged
    flagged = [run_sync(m.observe(store, "mallory", odd, 30.0 + i)).flagged for i in range(4)]
    assert flagged[-1]
