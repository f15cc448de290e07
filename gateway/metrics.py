"""Prometheus metrics of the gateway, built against an injected registry.

Stats of the pass-through path (the stages that come later add their own):

=====================================  =========  =====================================
name                                   type       labels
=====================================  =========  =====================================
tfshield_requests_total                counter    model, method, code
tfshield_request_duration_seconds      histogram  method (whole call, as the client sees it)
tfshield_upstream_duration_seconds     histogram  method (the forwarded call alone)
tfshield_in_flight_requests            gauge      -
tfshield_upstream_up                   gauge      - (1 while the upstream is reachable)
tfshield_invalid_requests_total        counter    method, reason
tfshield_upstream_errors_total         counter    method, code (errors the upstream returned)
=====================================  =========  =====================================

There is no per-client label: clients are unbounded, series must not be.
Model names come from clients too, so only the first ``max_model_labels``
distinct names become label values; the rest are counted as ``_other``.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily

# From 100 µs (the gateway's own overhead) to 30 s (a slow model).
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
OTHER_MODEL = "_other"
# Below this many values a plain loop beats numpy's per-call overhead.
_LOOP_BELOW = 8


class BatchHistogram:
    """A labelled histogram that counts a whole array of observations at once, or one quickly.

    prometheus-client's ``Histogram.observe`` costs about 1.3 µs per value
    (several on a cold cache, as on the request path): a Python loop over the
    buckets, each step under a lock. A detector that scores a 32-sample
    request would spend ~40 µs only on observing its scores. Here a batch is
    put into buckets by one ``np.searchsorted`` and one ``np.bincount``, a few
    microseconds for any batch size, and one value (``observe``, the gateway's
    per-call latencies) by one ``bisect`` under one lock.

    The exposition is that of a ``Histogram`` with the same name and buckets
    (``_bucket{le=...}``, ``_count``, ``_sum``), without the ``_created``
    sample. ``le`` is inclusive, as in Prometheus: a value equal to a bound
    counts in that bound's bucket. A NaN counts only in the ``+Inf`` bucket
    and is left out of ``_sum``, so that one NaN does not turn the sum into
    NaN for good.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(float(b)))
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket bound")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        self._bounds_array = np.asarray(bounds, dtype=np.float64)
        self._children: dict[tuple[str, ...], BatchHistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> BatchHistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {len(values)} values")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, BatchHistogramChild(self._bounds, self._bounds_array))
        return child

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            counts, total = child.snapshot()
            cumulative = np.cumsum(counts).tolist()
            upper = [str(b) for b in self._bounds] + ["+Inf"]
            family.add_metric(list(key), list(zip(upper, cumulative, strict=True)), total)
        yield family


class BatchHistogramChild:
    """One label set of a :class:`BatchHistogram`; safe to use from several threads."""

    __slots__ = ("_bounds", "_bounds_array", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...], bounds_array: np.ndarray) -> None:
        self._bounds = bounds
        self._bounds_array = bounds_array
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        if value != value:  # NaN: +Inf bucket only
            with self._lock:
                self._counts[-1] += 1
            return
        slot = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[slot] += 1
            self._sum += value

    def observe_many(self, values: np.ndarray | Sequence[float]) -> None:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.size == 0:
            return
        if array.size < _LOOP_BELOW:
            items = array.tolist()
            slots = [len(self._bounds) if v != v else bisect.bisect_left(self._bounds, v) for v in items]
            total = math.fsum(v for v in items if v == v)
            with self._lock:
                for slot in slots:
                    self._counts[slot] += 1
                self._sum += total
            return
        # searchsorted puts NaN past every bound, i.e. in +Inf.
        counts = np.bincount(
            np.searchsorted(self._bounds_array, array, side="left"), minlength=len(self._bounds) + 1
        )
        total = float(array.sum())
        if total != total:  # a NaN among them (nansum copies the array, so only then)
            total = float(np.nansum(array))
        with self._lock:
            self._counts += counts
            self._sum += total

    def snapshot(self) -> tuple[np.ndarray, float]:
        with self._lock:
            return self._counts.copy(), self._sum


class LabelledChildren:
    """``metric.labels(*values)``, looked up once per tuple of label values.

    prometheus-client's ``labels()`` validates its arguments and takes a lock on
    every call; on the request path a dict lookup does the same job. Only for
    metrics whose label values are bounded (as every label of the gateway's is),
    since each tuple seen is kept.
    """

    __slots__ = ("_children", "_labels")

    def __init__(self, metric: Any) -> None:
        self._labels = metric.labels
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._labels(*values)
        return child


class BoundedLabel:
    """Maps free-form values to at most ``limit`` label values (+ ``_other``)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER_MODEL


class AfterResponse:
    """Bookkeeping a call owes that its client need not wait for.

    A handler's last lines run before gRPC sends its response, so a counter
    bumped there is paid inside the client's latency, and paid with cold caches
    after the wait for the upstream. Work added here runs on the event loop's
    next turn, once the response is on its way; with no running loop, at once.

    Registered as a collector (with no metrics of its own) before any metric it
    updates, it also drains when the registry is collected, so a scrape never
    misses a call whose response the client already holds. Safe to drain from
    the scrape thread: each item is popped once.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._work: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        self._scheduled = False  # touched by the event loop's thread only
        if registry is not None:
            registry.register(self)  # type: ignore[arg-type]  # a collector: describe() and collect()

    def add(self, fn: Callable[..., object], *args: object) -> None:
        self._work.append((fn, args))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()
            return
        self._scheduled = True
        loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self.drain()

    def drain(self) -> None:
        work = self._work
        while True:
            try:
                fn, args = work.popleft()
            except IndexError:
                return
            fn(*args)

    @property
    def pending(self) -> int:
        return len(self._work)

    def describe(self) -> list[object]:
        return []

    def collect(self) -> list[object]:
        self.drain()
        return []


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, max_model_labels: int = 64) -> None:
        self.registry = registry
        # First in the registry, so that draining it at a scrape comes before the metrics it updates.
        self.after = AfterResponse(registry)
        self.model_label = BoundedLabel(max_model_labels)
        self.requests = Counter(
            "tfshield_requests",
            "Requests handled, by model, method and final gRPC status code.",
            ["model", "method", "code"],
            registry=registry,
        )
        self.requests_child = LabelledChildren(self.requests)
        # Observed on every call: BatchHistogram's one-value observe is a bisect under one lock.
        self.request_duration = BatchHistogram(
            "tfshield_request_duration_seconds",
            "Time from receiving a request to sending its answer.",
            ["method"],
            LATENCY_BUCKETS_S,
            registry,
        )
        self.upstream_duration = BatchHistogram(
            "tfshield_upstream_duration_seconds",
            "Time of the forwarded call to the upstream model server.",
            ["method"],
            LATENCY_BUCKETS_S,
            registry,
        )
        self.in_flight = Gauge(
            "tfshield_in_flight_requests", "Requests being handled right now.", registry=registry
        )
        self.upstream_up = Gauge(
            "tfshield_upstream_up",
            "1 while the upstream model server is reachable, else 0.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "tfshield_upstream_errors",
            "Calls the upstream answered with an error (not the gateway's own refusals), by method and code.",
            ["method", "code"],
            registry=registry,
        )
        self.invalid_requests = Counter(
            "tfshield_invalid_requests",
            "Requests refused as malformed before forwarding, by method and reason.",
            ["method", "reason"],
            registry=registry,
        )
