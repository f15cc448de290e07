"""Micro-batching: score samples from concurrent requests in one numpy call.

Python pays per call and numpy per batch (DESIGN.md, decision 3), so samples
from concurrent requests are gathered into one batch, scored in a worker
thread, and the scores scattered back to each request.

A batch is flushed when it holds ``max_batch_size`` samples, when its oldest
sample has waited ``max_batch_delay_s``, or as soon as no other request that
could still join it is in flight (``others_pending() == 0``): at concurrency 1
nobody waits for a batch that cannot grow, so batching costs nothing at low
load and gathers more the busier the gateway is.

A batch of at most ``inline_max_samples`` samples is scored on the event loop
itself (a lone request's straight away in ``submit``, without a trip through
the batching task): handing it to the worker thread and back costs ~60-170 µs in process and
0.6-1 ms of p50 in the gateway under load (the thread must win a core and the
GIL), more than scoring 32 MNIST samples does (~170 µs for validation and
Mahalanobis), so a thread pays only where batching under concurrency has
gathered more than that. Scoring inline blocks the loop for as long
(``DetectionConfig.inline_max_samples``, default 32, says why).

The queue is bounded in samples. ``submit`` on a full queue raises
:class:`QueueFull` at once (the caller applies the failure policy); it never
blocks the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from gateway.errors import TfshieldError

R = TypeVar("R")


class QueueFull(TfshieldError):
    """The batcher's queue holds ``max_queue_samples`` already."""


@dataclass(slots=True)
class _Pending:
    samples: np.ndarray
    future: asyncio.Future[object]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[R]):
    """Gathers samples of one shape across requests and scores them together.

    ``score_batch(batch) -> R`` runs in a worker thread on the concatenated
    samples; ``split(result, start, stop) -> R`` cuts one request's share out
    of the batch result.
    """

    def __init__(
        self,
        score_batch: Callable[[np.ndarray], R],
        split: Callable[[R, int, int], R],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_samples: int,
        others_pending: Callable[[], int] = lambda: 0,
        executor: ThreadPoolExecutor | None = None,
        on_batch: Callable[[int, list[float]], None] | None = None,
        inline_max_samples: int = 0,
    ) -> None:
        self._score_batch = score_batch
        self._split = split
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_samples = max_queue_samples
        self._others_pending = others_pending
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfshield-score")
        self._on_batch = on_batch
        self.inline_max_samples = inline_max_samples
        self._queue: list[_Pending] = []
        self._queued_samples = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    async def submit(self, samples: np.ndarray) -> R:
        """Score ``samples`` (n, ...) as part of a batch; returns this request's share."""
        n = len(samples)
        if self._queued_samples + n > self.max_queue_samples:
            raise QueueFull(f"scoring queue full ({self._queued_samples} samples waiting)")
        if n <= self.inline_max_samples and not self._queue and self._others_pending() <= 1:
            # Alone (in flight counts this request): no batch can form, so score now
            # instead of waking the batching task and waiting for it, two trips
            # through the event loop (~40 µs in process, more under gRPC's loop).
            if self._on_batch is not None:
                self._on_batch(n, [0.0])
            return self._split(self._score_batch(samples), 0, n)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(samples, future))
        self._queued_samples += n
        self._wakeup.set()
        return await future  # type: ignore[return-value]

    def _take_batch(self) -> list[_Pending]:
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].samples) <= self.max_batch_size):
            item = self._queue.pop(0)
            batch.append(item)
            size += len(item.samples)
        self._queued_samples -= size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for more only while the batch can still grow and others may join it.
            deadline = self._queue[0].enqueued + self.max_batch_delay_s
            while (
                self._queued_samples < self.max_batch_size
                and self._others_pending() > len(self._queue)
                and (remaining := deadline - time.perf_counter()) > 0
            ):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            started = time.perf_counter()
            if self._on_batch is not None:
                self._on_batch(sum(len(p.samples) for p in batch), [started - p.enqueued for p in batch])
            samples = batch[0].samples if len(batch) == 1 else np.concatenate([p.samples for p in batch])
            try:
                if len(samples) <= self.inline_max_samples:
                    result = self._score_batch(samples)
                else:
                    result = await loop.run_in_executor(self._executor, self._score_batch, samples)
            except Exception as exc:  # the scorer's error goes to each waiting request
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            start = 0
            for pending in batch:
                stop = start + len(pending.samples)
                if not pending.future.done():  # the request may have been cancelled meanwhile
                    pending.future.set_result(self._split(result, start, stop))
                start = stop

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in self._queue:
            if not pending.future.done():
                pending.future.cancel()
        self._executor.shutdown(wait=False)
