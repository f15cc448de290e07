"""BatchHistogram: the same exposition as prometheus-client's Histogram, batch by batch.

AfterResponse: per-call bookkeeping runs after the handler's turn, yet a scrape never misses it.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import AfterResponse, BatchHistogram, GatewayMetrics

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 10.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@pytest.mark.parametrize("batch", [1, 3, 7, 8, 32, 500])
def test_counts_and_sum_match_prometheus_histogram(batch: int) -> None:
    rng = np.random.default_rng(batch)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("score", "doc", ["detector"], BUCKETS, ours_registry)
    theirs = Histogram("score", "doc", ["detector"], buckets=BUCKETS, registry=theirs_registry)
    for round_ in range(5):
        # Values on the bounds themselves, below the first, above the last, and in between.
        values = np.concatenate([rng.exponential(1.5, batch), rng.choice(BUCKETS, batch), [-1.0, 1e9]])
        for name in ("a", "b") if round_ % 2 else ("a",):
            ours.labels(name).observe_many(values)
            for value in values.tolist():
                theirs.labels(name).observe(value)
    mine, reference = _samples(ours_registry), _samples(theirs_registry)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key] == pytest.approx(value, rel=1e-12), key


def test_one_value_at_a_time_matches_prometheus_histogram() -> None:
    rng = np.random.default_rng(0)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("latency", "doc", ["method"], BUCKETS, ours_registry)
    theirs = Histogram("latency", "doc", ["method"], buckets=BUCKETS, registry=theirs_registry)
    values = np.concatenate([rng.exponential(1.5, 200), BUCKETS, [-1.0, 0.0, 1e9]]).tolist()
    for index, value in enumerate(values):
        method = "Predict" if index % 3 else "Classify"
        ours.labels(method).observe(value)
        theirs.labels(method).observe(value)
    mine, reference = _samples(ours_registry), _samples(theirs_registry)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key] == pytest.approx(value, rel=1e-12), key


def test_exposition_is_a_histogram_with_inclusive_bounds() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("tfshield_x", "doc", ["model"], BUCKETS, registry)
    histogram.labels("m").observe(1.0)  # exactly on a bound: counts in le="1.0"
    text = generate_latest(registry).decode()
    assert "# TYPE tfshield_x histogram" in text
    assert 'tfshield_x_bucket{le="0.5",model="m"} 0.0' in text
    assert 'tfshield_x_bucket{le="1.0",model="m"} 1.0' in text
    assert 'tfshield_x_bucket{le="+Inf",model="m"} 1.0' in text
    assert 'tfshield_x_count{model="m"} 1.0' in text


def test_nan_counts_in_inf_bucket_and_stays_out_of_the_sum() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("h", "doc", [], BUCKETS, registry)
    histogram.labels().observe_many([0.2, math.nan, 3.0])
    histogram.labels().observe_many(np.array([math.nan] * 10 + [0.2]))
    histogram.labels().observe(math.nan)
    samples = _samples(registry)
    assert samples[("h_bucket", (("le", "0.25"),))] == 2
    assert samples[("h_bucket", (("le", "10.0"),))] == 3
    assert samples[("h_bucket", (("le", "+Inf"),))] == 15
    assert samples[("h_count", ())] == 15
    assert samples[("h_sum", ())] == pytest.approx(3.4)


def test_wrong_label_count_and_no_finite_bucket_are_refused() -> None:
    histogram = BatchHistogram("h", "doc", ["a", "b"], BUCKETS, CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        histogram.labels("only-one")
    with pytest.raises(ValueError, match="finite bucket"):
        BatchHistogram("g", "doc", [], (math.inf,), CollectorRegistry())


def test_after_response_waits_for_the_loops_next_turn() -> None:
    registry = CollectorRegistry()
    after = AfterResponse(registry)
    calls = Counter("calls", "doc", registry=registry)

    async def handler() -> tuple[float, int]:
        after.add(calls.inc)
        after.add(calls.inc, 2.0)
        seen = calls._value.get(), after.pending  # what the handler's own turn still sees
        await asyncio.sleep(0)
        return seen

    seen = asyncio.run(handler())
    assert seen == (0.0, 2)
    assert calls._value.get() == 3.0 and after.pending == 0


def test_after_response_runs_at_once_without_a_loop() -> None:
    after = AfterResponse()
    done: list[int] = []
    after.add(done.append, 1)
    assert done == [1] and after.pending == 0


def test_a_scrape_drains_pending_work_before_collecting() -> None:
    # The gateway's own metrics: a response the client holds is counted in the next scrape,
    # even if the event loop has not had its next turn yet.
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)

    async def handler() -> bytes:
        metrics.after.add(metrics.requests_child("m", "Predict", "OK").inc)
        metrics.after.add(metrics.request_duration.labels("Predict").observe, 0.002)
        return generate_latest(registry)  # no await between: the loop has not turned

    text = asyncio.run(handler()).decode()
    assert 'tfshield_requests_total{code="OK",method="Predict",model="m"} 1.0' in text
    assert 'tfshield_request_duration_seconds_count{method="Predict"} 1.0' in text


def test_each_item_runs_once_while_a_scrape_thread_drains() -> None:
    registry = CollectorRegistry()
    after = AfterResponse(registry)
    calls = Counter("calls", "doc", registry=registry)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            list(registry.collect())

    def bookkeeping() -> None:
        time.sleep(0)  # lets the scrape thread in mid-drain
        calls.inc()

    async def handlers() -> None:
        for i in range(20_000):
            after.add(bookkeeping)
            if i % 50 == 0:
                await asyncio.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, mid-drain too
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        asyncio.run(handlers())
    finally:
        stop.set()
        scraper.join()
        sys.setswitchinterval(interval)
    after.drain()
    assert calls._value.get() == 20_000
