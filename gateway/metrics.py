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

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, max_model_labels: int = 64) -> None:
        self.registry = registry
        self.model_label = BoundedLabel(max_model_labels)
        self.requests = Counter(
            "tfshield_requests",
            "Requests handled, by model, method and final gRPC status code.",
            ["model", "method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "tfshield_request_duration_seconds",
            "Time from receiving a request to sending its answer.",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "tfshield_upstream_duration_seconds",
            "Time of the forwarded call to the upstream model server.",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
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
