"""Volume and coverage: a per-client rate limit, and how a client's predicted classes are spread.

Two monitors, because they answer different questions and map to different
outcomes:

``rate_limit`` (:class:`RateLimit`)
    a token bucket per client, counted in samples (a request of n samples
    costs n tokens): ``burst`` tokens, refilled at ``rate_per_s``. A request
    beyond it gets ``MonitorResult.rate_limited=True``, which the gateway
    maps to RESOURCE_EXHAUSTED (a refused request costs no tokens). It is a
    quota, not evidence: it never flags and its risk is always 0, so heavy
    benign users are slowed down, never suspected. Its limits are policy
    (configured), not learned: ``calibrate`` sets no statistical threshold
    (``threshold_`` is 0 and unused).

``class_coverage`` (:class:`ClassCoverage`)
    the entropy of the client's predicted-class histogram against the benign
    prior, as the Kullback–Leibler divergence KL(p̂ ‖ prior) in nats. Natural
    benign traffic covers the classes roughly like the benign prior; model
    extraction with synthetic or out-of-domain queries (random noise, blobs,
    Papernot's augmentation from a few seeds) piles up in a few classes, an
    adaptive thief (KnockoffNets' adaptive policy) concentrates on the classes
    that reward it, and a boundary walk alternates between two. The histogram
    is smoothed with ``prior_weight`` pseudo-queries drawn from the prior
    (p̂ = (counts + w·prior) / (N + w)), so a client with a handful of queries
    sits at the prior instead of at an extreme, and decays with half-life
    ``half_life_s`` so the score follows recent behaviour. For a benign
    client the divergence *shrinks* as it sends more (the histogram converges
    to the prior), so volume alone never raises it: no test statistic that
    grows with N (a χ² or G-test would flag any heavy user whose mix differs
    slightly from the prior). Flagged above ``threshold_`` (calibrated).
"""

from __future__ import annotations

import math

import numpy as np

from detectors.base import DetectorError, register
from detectors.monitor import Monitor, MonitorResult, QueryBatch
from gateway.store import Store

__all__ = ["ClassCoverage", "RateLimit"]


@register
class RateLimit(Monitor):
    """A token bucket per client, in samples; ``rate_limited`` when a request does not fit.

    Hyperparameters: ``rate_per_s`` (samples per second refilled, default
    200), ``burst`` (bucket size in samples, default 2000), ``state_ttl_s``
    (seconds a silent client is remembered, default 3600; a forgotten client
    starts with a full bucket, which it would have by then anyway when
    ``burst / rate_per_s`` ≤ ``state_ttl_s``).

    Score: the tokens left after this request (samples the client may still
    send at once). Never flagged; risk 0.
    """

    name = "rate_limit"
    params = ("rate_per_s", "burst", "state_ttl_s")
    max_state_bytes = 96

    def __init__(self, rate_per_s: float = 200.0, burst: float = 2000.0, state_ttl_s: float = 3600.0) -> None:
        if not rate_per_s > 0 or not burst >= 1 or not state_ttl_s > 0:
            raise DetectorError(
                f"rate_limit: rate_per_s must be > 0, burst >= 1 and state_ttl_s > 0; got "
                f"{rate_per_s}, {burst}, {state_ttl_s}"
            )
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.state_ttl_s = float(state_ttl_s)

    def calibrate_batches(self, batches: list[list[QueryBatch]], fpr: float) -> RateLimit:
        """A quota is configured, not learned: records ``fpr`` and a threshold of 0 (unused)."""
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"{self.name}: fpr must be in (0, 1), got {fpr}")
        self.threshold_ = 0.0
        self.target_fpr_ = float(fpr)
        return self

    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        key = self.key(client)
        (blob,) = await store.get_many([key])
        state = self._decode(blob)
        tokens, last = self.burst, now
        if state is not None and "bucket" in state and state["bucket"].shape == (2,):
            tokens, last = (float(v) for v in state["bucket"])
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate_per_s)
        cost = float(len(batch.x))
        limited = cost > tokens
        if not limited:
            tokens -= cost
        bucket = np.array([tokens, max(now, last)], dtype=np.float64)
        await store.set_many([(key, self._encode({"bucket": bucket}))], self.state_ttl_s)
        return MonitorResult(self.name, tokens, False, 0.0, rate_limited=limited)


@register
class ClassCoverage(Monitor):
    """KL divergence of a client's (smoothed, decaying) predicted-class histogram from the benign prior.

    Hyperparameters: ``n_classes`` (default 10), ``prior_weight`` (pseudo-
    queries of smoothing, default 50), ``half_life_s`` (of the counts,
    default 3600), ``state_ttl_s`` (default 86400).

    Learned by calibration: ``prior_`` (n_classes,), the benign clients'
    predicted-class frequencies (add-one smoothed), and ``threshold_``.

    Score: KL(p̂ ‖ prior) in nats, ≥ 0; flagged above ``threshold_``.
    """

    name = "class_coverage"
    params = ("n_classes", "prior_weight", "half_life_s", "state_ttl_s")
    needs_prediction = True
    flags_when = "above"

    prior_: np.ndarray

    def __init__(
        self,
        n_classes: int = 10,
        prior_weight: float = 50.0,
        half_life_s: float = 3600.0,
        state_ttl_s: float = 86400.0,
    ) -> None:
        if int(n_classes) != n_classes or n_classes < 2:
            raise DetectorError(f"class_coverage: n_classes must be an integer >= 2, got {n_classes}")
        if not prior_weight > 0 or not half_life_s > 0 or not state_ttl_s > 0:
            raise DetectorError("class_coverage: prior_weight, half_life_s and state_ttl_s must be > 0")
        self.n_classes = int(n_classes)
        self.prior_weight = float(prior_weight)
        self.half_life_s = float(half_life_s)
        self.state_ttl_s = float(state_ttl_s)

    @property
    def max_state_bytes(self) -> int:  # type: ignore[override]
        return 4 * self.n_classes + 96

    def _state(self) -> dict[str, np.ndarray]:
        return {"prior_": self.prior_}

    def _learn_from_benign(self, batches: list[list[QueryBatch]]) -> None:
        counts = np.ones(self.n_classes)
        for sequence in batches:
            for batch in sequence:
                if batch.predicted is not None:
                    counts += np.bincount(self._classes(batch), minlength=self.n_classes)
        self.prior_ = counts / counts.sum()

    def _classes(self, batch: QueryBatch) -> np.ndarray:
        if batch.predicted is None:
            raise DetectorError("class_coverage: needs the predicted classes; run it after the response")
        predicted = np.asarray(batch.predicted).astype(np.int64)
        if predicted.size and (predicted.min() < 0 or predicted.max() >= self.n_classes):
            raise DetectorError(
                f"class_coverage: predicted class outside [0, {self.n_classes}); set n_classes"
            )
        return predicted

    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        predicted = self._classes(batch)
        if not hasattr(self, "prior_"):
            raise DetectorError("class_coverage: no benign prior; call calibrate() first")
        key = self.key(client)
        (blob,) = await store.get_many([key])
        state = self._decode(blob)
        counts = np.zeros(self.n_classes, dtype=np.float32)
        if state is not None and state.get("counts", counts).shape == counts.shape and "t" in state:
            elapsed = max(0.0, now - float(state["t"]))
            counts = state["counts"] * np.float32(0.5 ** (elapsed / self.half_life_s))
        counts += np.bincount(predicted, minlength=self.n_classes).astype(np.float32)
        blob = self._encode({"counts": counts.astype(np.float32), "t": np.float64(now)})
        await store.set_many([(key, blob)], self.state_ttl_s)
        total = float(counts.sum())
        smoothed = (counts.astype(np.float64) + self.prior_weight * self.prior_) / (total + self.prior_weight)
        divergence = float(np.sum(smoothed * np.log(smoothed / self.prior_)))
        return self._result(max(0.0, divergence) if math.isfinite(divergence) else 0.0)
