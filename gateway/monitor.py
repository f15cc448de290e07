"""The monitor stage: per-client query-pattern monitors and client risk.

For each monitored model (``monitors.models`` in the config, each a folder
written by ``tfshield calibrate --monitors-out``: an embedding and calibrated
monitors, see :mod:`detectors.monitor_calibration`):

- on the request, the input is embedded once and the monitors that need no
  prediction (Blacklight fingerprints, stateful k-NN, the rate limit) observe
  it; a client over its rate limit is refused with RESOURCE_EXHAUSTED (a
  limit, not a verdict: it never raises the client's risk);
- on the response, the monitors that need the model's top-1 class (PRADA,
  class coverage) observe it with the classes read from the response;
- after each half, the client's risk (:class:`detectors.risk.ClientRisk`, in
  [0, 1], decaying) is updated and left on the call for the policy, which
  decides before forwarding and again on the response.

State lives in the configured store (memory, or Redis shared by replicas).
If the store fails, ``monitors.failure_mode`` decides: ``closed`` refuses
(UNAVAILABLE), ``open`` serves the call unmonitored. Both are counted.

Stats:

==========================================  =========  ===========================
tfshield_monitor_flags_total                counter    monitor (queries after which the client was flagged)
tfshield_rate_limited_total                 counter    -
tfshield_client_risk                        histogram  - (the client's risk after each query)
tfshield_clients_tracked                    gauge      - (clients with a risk above the tracking floor)
tfshield_store_operation_duration_seconds   histogram  backend, op
tfshield_store_errors_total                 counter    backend
tfshield_monitor_failures_total             counter    mode
==========================================  =========  ===========================
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detectors.monitor import Monitor, MonitorResult, QueryBatch
from detectors.monitor_calibration import MonitorSuite
from detectors.risk import RISK_SET, ClientRisk
from gateway.codec import tensor_to_numpy
from gateway.config import MonitoredModelConfig, MonitorsConfig, StoreConfig
from gateway.errors import ConfigError, InvalidInput
from gateway.pipeline import Call, Refusal, Stage
from gateway.store import MemoryStore, RedisStore, Store, StoreError
from protos import predict_pb2

log = logging.getLogger(__name__)

RISK_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
STORE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)
RESPONSE_MAX_ELEMENTS = 2**40


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.flags = Counter(
            "tfshield_monitor_flags",
            "Queries after which a monitor flagged the client.",
            ["monitor"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "tfshield_rate_limited", "Requests refused by a client's rate limit.", registry=registry
        )
        self.client_risk = Histogram(
            "tfshield_client_risk",
            "The querying client's risk after each query.",
            buckets=RISK_BUCKETS,
            registry=registry,
        )
        self.clients_tracked = Gauge(
            "tfshield_clients_tracked", "Clients whose risk is above the tracking floor.", registry=registry
        )
        self.store_duration = Histogram(
            "tfshield_store_operation_duration_seconds",
            "Time of one state-store operation.",
            ["backend", "op"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "tfshield_store_errors", "State-store operations that failed.", ["backend"], registry=registry
        )
        self.failures = Counter(
            "tfshield_monitor_failures",
            "Requests the monitors' failure mode decided (store unavailable), by mode.",
            ["mode"],
            registry=registry,
        )


class InstrumentedStore(Store):
    """Times every operation of the store it wraps and counts its failures."""

    def __init__(self, inner: Store, metrics: MonitorMetrics) -> None:
        self.inner = inner
        self.backend = inner.backend
        self._errors = metrics.store_errors.labels(inner.backend)
        self._timers = {
            op: metrics.store_duration.labels(inner.backend, op)
            for op in ("get_many", "set_many", "incr_many", "delete", "zadd", "ztop", "zrem", "zcard", "ping")
        }

    async def _timed(self, op: str, awaitable):
        started = time.perf_counter()
        try:
            return await awaitable
        except StoreError:
            self._errors.inc()
            raise
        finally:
            self._timers[op].observe(time.perf_counter() - started)

    async def get_many(self, keys):
        return await self._timed("get_many", self.inner.get_many(keys))

    async def set_many(self, items, ttl_s):
        return await self._timed("set_many", self.inner.set_many(items, ttl_s))

    async def incr_many(self, keys, ttl_s):
        return await self._timed("incr_many", self.inner.incr_many(keys, ttl_s))

    async def delete(self, keys):
        return await self._timed("delete", self.inner.delete(keys))

    async def zadd(self, key, member, score):
        return await self._timed("zadd", self.inner.zadd(key, member, score))

    async def ztop(self, key, limit, min_score=float("-inf")):
        return await self._timed("ztop", self.inner.ztop(key, limit, min_score))

    async def zrem(self, key, member):
        return await self._timed("zrem", self.inner.zrem(key, member))

    async def zcard(self, key):
        return await self._timed("zcard", self.inner.zcard(key))

    async def ping(self):
        return await self._timed("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()


def build_store(config: StoreConfig) -> Store:
    if config.backend == "redis":
        password = os.environ.get(config.password_env) if config.password_env else None
        if config.password_env and not password:
            raise ConfigError(f"monitors.store.password_env: {config.password_env} is not set")
        return RedisStore(config.url, timeout_s=config.timeout_s, password=password)
    return MemoryStore(max_keys=config.max_keys)


@dataclass
class MonitoredModel:
    config: MonitoredModelConfig
    suite: MonitorSuite
    before: list[Monitor]  # observe the request
    after: list[Monitor]  # observe the response (need the predicted class)
    needs_embedding: bool


@dataclass(slots=True)
class MonitorCallState:
    model: MonitoredModel
    batch: QueryBatch
    now: float
    risk: float = 0.0
    results: list[MonitorResult] = field(default_factory=list)


class ClientRiskView:
    """What the control API needs: ClientRisk bound to the gateway's store, plus reset of monitor state."""

    def __init__(self, risk: ClientRisk, monitors: Iterable[Monitor]) -> None:
        self.risk = risk
        self.monitors = list(monitors)

    async def get(self, store: Store, client: str, now: float) -> float:
        return await self.risk.get(store, client, now)

    async def top(self, store: Store, limit: int, min_risk: float = 0.0):
        return await self.risk.top(store, limit, min_risk)

    async def describe(self, store: Store, client: str, now: float) -> dict[str, dict[str, float]]:
        """What GetClient shows beside the risk: the monitor risks behind it."""
        return {"monitor_risk": await self.risk.monitor_risks(store, client, now)}

    async def reset(self, store: Store, client: str) -> bool:
        existed = await self.risk.get(store, client, time.time()) > 0
        await self.risk.reset(store, client)
        for monitor in self.monitors:
            await monitor.reset(store, client)
        return existed


class MonitorStage(Stage):
    name = "monitors"

    def __init__(self, config: MonitorsConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.metrics = MonitorMetrics(registry)
        self.store: Store = InstrumentedStore(build_store(config.store), self.metrics)
        self.risk = ClientRisk(half_life_s=config.risk_half_life_s, combine=config.risk_combine)
        self._closed = config.failure_mode == "closed"
        salt = os.environ.get(config.fingerprint_salt_env, "")
        self.models: dict[str, MonitoredModel] = {}
        for model_config in config.models:
            try:
                suite = MonitorSuite.load(model_config.suite)
            except Exception as exc:
                raise ConfigError(f"monitors: cannot load {model_config.suite}: {exc}") from None
            for monitor in suite.monitors.values():
                if hasattr(monitor, "set_secret"):
                    if salt:
                        monitor.set_secret(salt)
                    else:
                        log.warning(
                            "%s is not set: %s uses a random salt, so replicas do not share its index",
                            config.fingerprint_salt_env,
                            monitor.name,
                        )
            monitors = list(suite.monitors.values())
            self.models[model_config.model] = MonitoredModel(
                model_config,
                suite,
                [m for m in monitors if not m.needs_prediction],
                [m for m in monitors if m.needs_prediction],
                any(getattr(m, "needs_embedding", True) for m in monitors),
            )
        self.view = ClientRiskView(
            self.risk, (m for mm in self.models.values() for m in mm.suite.monitors.values())
        )
        self._refresh_task: asyncio.Task[None] | None = None

    # -- helpers -----------------------------------------------------------------

    def _store_failed(self, exc: StoreError) -> None:
        log.warning("state store failed: %s", exc)
        if self._closed:
            self.metrics.failures.labels("closed").inc()
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                "the gateway's client-state store is unavailable; retry later",
                rule="store_unavailable",
            )
        self.metrics.failures.labels("open").inc()

    async def _observe(self, call: Call, state: MonitorCallState, monitors: Sequence[Monitor]) -> None:
        if not monitors:
            return
        try:
            results = await asyncio.gather(
                *(m.observe(self.store, call.client_id, state.batch, state.now) for m in monitors)
            )
            for result in results:
                if result.flagged:
                    self.metrics.flags.labels(result.monitor).inc()
            state.results.extend(results)
            state.risk = await self.risk.update(self.store, call.client_id, results, state.now)
        except StoreError as exc:
            self._store_failed(exc)
            return
        self.metrics.client_risk.observe(state.risk)
        limited = [r for r in results if r.rate_limited]
        if limited:
            self.metrics.rate_limited.inc()
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit exceeded for this client (rule '{limited[0].monitor}'); slow down",
                rule=limited[0].monitor,
            )

    # -- the request path ------------------------------------------------------------

    async def on_request(self, call: Call) -> None:
        if call.method != "Predict":
            return
        monitored = self.models.get(call.model)
        if monitored is None:
            return
        x = call.inputs.get(monitored.config.input)
        if x is None:
            raise InvalidInput(
                monitored.config.input, "is missing; this model's monitors read it", reason="missing"
            )
        flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        embedding = monitored.suite.embedding.transform(flat) if monitored.needs_embedding else flat[:, :0]
        state = MonitorCallState(monitored, QueryBatch(flat, embedding), time.time())
        call.monitor_state = state
        try:
            state.risk = await self.risk.get(self.store, call.client_id, state.now)
        except StoreError as exc:
            self._store_failed(exc)
        await self._observe(call, state, monitored.before)

    async def on_response(self, call: Call, response: bytes) -> bytes:
        state = call.monitor_state
        if not isinstance(state, MonitorCallState) or not state.model.after:
            return response
        output = state.model.config.output
        try:
            tensor = predict_pb2.PredictResponse.FromString(response).outputs[output]
            scores = tensor_to_numpy(tensor, output, RESPONSE_MAX_ELEMENTS)
            predicted = scores.reshape(len(scores), -1).argmax(axis=1)
        except Exception as exc:  # a response without the output: the prediction monitors cannot run
            log.warning("monitors: cannot read output '%s' of %s: %s", output, call.model, exc)
            return response
        # Feature squeezing may have sent extra rows upstream: only the client's rows count.
        predicted = predicted[: len(state.batch.x)]
        state.batch = QueryBatch(state.batch.x, state.batch.embedding, predicted)
        await self._observe(call, state, state.model.after)
        return response

    # -- upkeep ------------------------------------------------------------------------

    async def start(self) -> None:
        self._refresh_task = asyncio.create_task(self._refresh_tracked())

    async def _refresh_tracked(self) -> None:
        while True:
            try:
                self.metrics.clients_tracked.set(await self.store.zcard(RISK_SET))
            except StoreError:
                pass
            await asyncio.sleep(15.0)

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        await self.store.close()


def risk_of(call: Call) -> float:
    state = call.monitor_state
    return state.risk if isinstance(state, MonitorCallState) else 0.0


def monitors_of(call: Call) -> list[MonitorResult]:
    state = call.monitor_state
    return state.results if isinstance(state, MonitorCallState) else []
