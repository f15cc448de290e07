"""The micro-batcher gathers concurrent requests into one scoring call and never stalls one."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from gateway.batching import MicroBatcher, QueueFull


def row_sums(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1).sum(axis=1)


def make(
    inflight: dict[str, int], sizes: list[int], threads: list[int] | None = None, **options
) -> MicroBatcher:
    def score(batch: np.ndarray) -> np.ndarray:
        if threads is not None:
            threads.append(threading.get_ident())
        return row_sums(batch)

    defaults = {"max_batch_size": 64, "max_batch_delay_s": 0.05, "max_queue_samples": 1000}
    return MicroBatcher(
        score,
        lambda result, start, stop: result[start:stop],
        others_pending=lambda: inflight["n"],
        on_batch=lambda n, waits: sizes.append(n),
        **{**defaults, **options},
    )


async def submit(batcher: MicroBatcher, inflight: dict[str, int], samples: np.ndarray) -> np.ndarray:
    inflight["n"] += 1
    try:
        return await batcher.submit(samples)
    finally:
        inflight["n"] -= 1


async def test_concurrent_requests_share_one_batch_and_get_their_own_rows() -> None:
    inflight, sizes = {"n": 0}, []
    batcher = make(inflight, sizes)
    results = await asyncio.gather(
        *(submit(batcher, inflight, np.full((2, 3), i, np.float32)) for i in range(10))
    )
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, [3 * i, 3 * i])
    assert sizes == [20]
    await batcher.close()


async def test_a_lone_request_does_not_wait_for_the_deadline() -> None:
    inflight, sizes = {"n": 0}, []
    batcher = make(inflight, sizes, max_batch_delay_s=5.0)
    result = await asyncio.wait_for(submit(batcher, inflight, np.ones((1, 4), np.float32)), timeout=1.0)
    np.testing.assert_array_equal(result, [4.0])
    await batcher.close()


async def test_batches_never_exceed_the_size_limit() -> None:
    inflight, sizes = {"n": 0}, []
    batcher = make(inflight, sizes, max_batch_size=8)
    await asyncio.gather(*(submit(batcher, inflight, np.ones((3, 2), np.float32)) for _ in range(6)))
    assert sum(sizes) == 18 and max(sizes) <= 8
    await batcher.close()


async def test_a_full_queue_refuses_at_once() -> None:
    inflight, sizes = {"n": 0}, []
    batcher = make(inflight, sizes, max_queue_samples=4)
    with pytest.raises(QueueFull, match="scoring queue full"):
        await batcher.submit(np.ones((5, 1), np.float32))
    await batcher.close()


async def test_a_scorer_error_reaches_every_request_of_the_batch() -> None:
    def fail(batch: np.ndarray) -> np.ndarray:
        raise ValueError("scorer broke")

    inflight = {"n": 0}
    batcher = MicroBatcher(
        fail,
        lambda r, a, b: r,
        max_batch_size=64,
        max_batch_delay_s=0.05,
        max_queue_samples=100,
        others_pending=lambda: inflight["n"],
    )
    outcomes = await asyncio.gather(
        *(submit(batcher, inflight, np.ones((1, 1), np.float32)) for _ in range(3)), return_exceptions=True
    )
    assert [str(o) for o in outcomes] == ["scorer broke"] * 3
    await batcher.close()


async def test_tiny_batches_are_scored_on_the_event_loop_and_big_ones_in_the_thread() -> None:
    inflight, sizes, threads = {"n": 0}, [], []
    batcher = make(inflight, sizes, threads, inline_max_samples=2)
    await submit(batcher, inflight, np.ones((1, 1), np.float32))
    await submit(batcher, inflight, np.ones((16, 1), np.float32))
    assert threads[0] == threading.get_ident()
    assert threads[1] != threading.get_ident()
    await batcher.close()


async def test_a_batch_of_exactly_inline_max_samples_is_scored_on_the_event_loop() -> None:
    inflight, sizes, threads = {"n": 0}, [], []
    batcher = make(inflight, sizes, threads, inline_max_samples=32)
    await submit(batcher, inflight, np.ones((32, 1), np.float32))
    await submit(batcher, inflight, np.ones((33, 1), np.float32))
    assert threads == [threading.get_ident(), threads[1]]
    assert threads[1] != threading.get_ident()
    await batcher.close()


async def test_a_lone_small_request_is_scored_in_submit_without_the_batching_task() -> None:
    inflight, sizes, threads = {"n": 0}, [], []
    batcher = make(inflight, sizes, threads, inline_max_samples=2)
    result = await submit(batcher, inflight, np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(result, [3.0, 3.0])
    assert sizes == [2] and threads == [threading.get_ident()]
    assert batcher._task is None
    await batcher.close()
