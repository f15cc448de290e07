"""Stateful k-NN: the mean distance to the k nearest earlier distinct queries."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.knn import StatefulKNN
from detectors.monitor import QueryBatch
from gateway.store import MemoryStore


def query(vector, content: int) -> QueryBatch:
    """A query whose embedding is ``vector`` and whose content (for exact-duplicate checks) is ``content``."""
    x = np.full((1, 4), content / 255.0, np.float32)
    return QueryBatch(x, np.asarray(vector, dtype=np.float32)[None], None)


def knn(**params) -> StatefulKNN:
    m = StatefulKNN(n_dims=2, **params).fit(np.zeros((2, 4)))
    m.threshold_ = 0.5
    m.target_fpr_ = 0.01
    return m


async def test_the_score_is_the_mean_distance_to_the_k_nearest():
    m = knn(k=2, history=8)
    store = MemoryStore()
    for i, x in enumerate([1.0, 2.0, 10.0]):
        await m.observe(store, "c", query([x, 0.0], i), 0.0)
    result = await m.observe(store, "c", query([0.0, 0.0], 99), 0.0)
    assert result.score == pytest.approx(1.5)


async def test_nan_until_k_earlier_queries():
    m = knn(k=3, history=8)
    store = MemoryStore()
    scores = [(await m.observe(store, "c", query([i, 0.0], i), 0.0)).score for i in range(4)]
    assert np.isnan(scores[:3]).all() and scores[3] == pytest.approx(2.0)


async def test_exact_duplicates_are_neither_neighbours_nor_stored_twice():
    m = knn(k=2, history=8)
    store = MemoryStore()
    await m.observe(store, "c", query([0.0, 0.0], 1), 0.0)
    await m.observe(store, "c", query([3.0, 0.0], 2), 0.0)
    again = await m.observe(store, "c", query([0.0, 0.0], 1), 0.0)  # the same image again
    assert np.isnan(again.score)  # only one distinct earlier query besides itself
    state = m._decode((await store.get_many([m.key("c")]))[0])
    assert int(state["stored"]) == 2


async def test_history_keeps_only_the_latest_queries():
    m = knn(k=1, history=2)
    store = MemoryStore()
    for i, x in enumerate([0.0, 100.0, 200.0]):
        await m.observe(store, "c", query([x, 0.0], i), 0.0)
    result = await m.observe(store, "c", query([1.0, 0.0], 50), 0.0)
    assert result.score == pytest.approx(99.0)  # 0.0 was pushed out


async def test_close_queries_are_flagged_and_a_batch_sees_its_own_earlier_samples():
    m = knn(k=2, history=8)
    store = MemoryStore()
    x = np.arange(3, dtype=np.float32)[:, None].repeat(4, 1) / 255
    embedding = np.array([[0.0, 0.0], [0.01, 0.0], [0.02, 0.0]], np.float32)
    result = await m.observe(store, "c", QueryBatch(x, embedding, None), 0.0)
    assert result.score == pytest.approx(0.015, rel=1e-3)  # float16 history
    assert result.flagged and result.risk > 0.5
