"""PRADA: the numpy Shapiro–Wilk test against scipy's, and the growing sets' bookkeeping."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import scipy.stats

from detectors.base import DetectorError
from detectors.monitor import QueryBatch
from detectors.prada import Prada, shapiro_wilk_w, shapiro_wilk_z
from gateway.store import MemoryStore


@pytest.mark.parametrize("n", [6, 11, 12, 32, 100, 128, 1000])
@pytest.mark.parametrize("distribution", ["normal", "exponential", "uniform"])
def test_w_and_its_p_value_match_scipy(n, distribution):
    x = getattr(np.random.default_rng(n), distribution)(size=n)
    expected = scipy.stats.shapiro(x)
    assert shapiro_wilk_w(x) == pytest.approx(expected.statistic, abs=1e-6)
    if n >= 12:
        p_value = 1.0 - NormalDist().cdf(shapiro_wilk_z(shapiro_wilk_w(x), n))
        assert p_value == pytest.approx(expected.pvalue, rel=1e-4, abs=1e-12)


def test_constant_distances_are_not_evidence():
    assert shapiro_wilk_w(np.full(40, 2.5)) == 1.0


def test_too_few_values_are_refused():
    with pytest.raises(DetectorError, match="at least 6 values"):
        shapiro_wilk_w(np.arange(5.0))
    with pytest.raises(DetectorError, match="needs 12 <= n <= 5000"):
        shapiro_wilk_z(0.9, 11)


def prada_for_tests(**params) -> Prada:
    m = Prada(n_classes=3, n_dims=2, **params).fit(np.zeros((2, 2)))
    m.duplicate_distance_ = 0.1
    return m


def query(vector, predicted: int) -> QueryBatch:
    vector = np.asarray(vector, dtype=np.float32)[None]
    return QueryBatch(vector, vector, np.array([predicted]))


async def test_the_first_query_of_a_class_starts_its_growing_set_without_a_distance():
    m = prada_for_tests(min_distances=12)
    store = MemoryStore()
    await m.observe(store, "c", query([0.0, 0.0], 0), 0.0)
    await m.observe(store, "c", query([5.0, 0.0], 1), 0.0)
    state = m._decode((await store.get_many([m.key("c")]))[0])
    assert int(state["recorded"]) == 0
    assert list(state["added"]) == [1, 1, 0]


async def test_a_far_query_grows_the_set_and_records_its_distance():
    m = prada_for_tests(min_distances=12)
    store = MemoryStore()
    for x in (0.0, 3.0, 4.0):
        await m.observe(store, "c", query([x, 0.0], 0), 0.0)
    state = m._decode((await store.get_many([m.key("c")]))[0])
    assert list(state["distances"][:2].astype(float)) == [3.0, 1.0]
    # T_0 after the first growth: mean - std of {3} = 3; 1.0 < 3 so the third query did not grow it
    assert int(state["added"][0]) == 2
    assert float(state["grow_threshold"][0]) == pytest.approx(3.0)


async def test_re_sends_of_a_recent_query_are_not_recorded():
    m = prada_for_tests(min_distances=12)
    store = MemoryStore()
    await m.observe(store, "c", query([0.0, 0.0], 0), 0.0)
    await m.observe(store, "c", query([3.0, 0.0], 0), 0.0)
    for _ in range(5):
        await m.observe(store, "c", query([3.05, 0.0], 0), 0.0)  # within duplicate_distance_ of a recent one
    state = m._decode((await store.get_many([m.key("c")]))[0])
    assert int(state["recorded"]) == 1


async def test_growing_sets_are_capped_oldest_out():
    m = prada_for_tests(min_distances=12, max_per_class=3)
    store = MemoryStore()
    for i in range(10):
        await m.observe(store, "c", query([10.0 * i * i, 0.0], 2), 0.0)
    state = m._decode((await store.get_many([m.key("c")]))[0])
    assert sorted(state["sets"][2, :, 0].astype(float)) == [490.0, 640.0, 810.0]


async def test_the_score_is_nan_until_min_distances_were_recorded():
    m = prada_for_tests(min_distances=12)
    store = MemoryStore()
    rng = np.random.default_rng(0)
    scores = [(await m.observe(store, "c", query(rng.normal(size=2) * 10, 0), 0.0)).score for _ in range(14)]
    assert np.isnan(scores[:12]).all()
    assert np.isfinite(scores[13])


def test_delta_is_the_w_at_the_threshold():
    m = Prada()
    m.threshold_ = 3.0
    w = m.delta(128)
    assert shapiro_wilk_z(w, 128) == pytest.approx(3.0)
    assert 0.9 < w < 1.0


async def test_a_predicted_class_beyond_n_classes_says_so():
    m = prada_for_tests()
    with pytest.raises(DetectorError, match=r"predicted class outside \[0, 3\); set n_classes"):
        await m.observe(MemoryStore(), "c", query([0.0, 0.0], 7), 0.0)
