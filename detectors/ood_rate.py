"""How often a client's queries fall off the benign data, against how often benign clients' do.

Papers: extraction queries are out of distribution more often than benign
ones, and a defence can key on that (Kariyappa & Qureshi, "Defending Against
Model Stealing Attacks with Adaptive Misinformation", CVPR 2020, per query);
a stateful detector compares each user's query distribution with the benign
one (Pal, Gupta, Kanade, Shevade, "Stateful Detection of Model Extraction
Attacks", VarDetect, arXiv 2107.05166, 2021, per user). Here the per-query
verdict is the input-space Mahalanobis score of
:class:`detectors.mahalanobis.MahalanobisDetector` (Lee et al., NeurIPS
2018), and the per-client test is a binomial one: is this client's rate of
off-distribution queries above the benign rate?

For each query, ``off`` = its Mahalanobis score exceeds ``query_threshold_``,
the ``1 − query_fpr`` quantile of the benign calibration queries, so a benign
query is off with probability ``null_rate_`` ≈ ``query_fpr``. Per client the
monitor keeps two decaying counts, queries ``n`` and off queries ``k``
(half-life ``half_life_s``), and scores

    score = n' · KL(k' / n' ‖ p₀)   if k' / n' > p₀, else 0,
    n' = n + m,   k' = k + m · p₀,   p₀ = null_rate_,   m = prior_queries

in nats: the exponent of the Chernoff bound on the chance that a client with
the benign rate shows as many off queries (a log-likelihood ratio of the
observed rate against p₀). ``m`` pseudo-queries at the benign rate keep a
client's first one or two queries from deciding alone. Flagged above
``threshold_``, set by replaying benign clients like every monitor.

What it assumes: benign clients query the distribution the reference data
came from. A client whose inputs are systematically different (another
scanner, another preprocessing) is flagged like a thief; give such clients a
group and a policy rule (``allow``) rather than loosening the threshold.

What it catches and what it cannot (offline, the demo MNIST split; per-query
rates at a 1 % query threshold, variance floor 10⁻³): benign held-out digits
1 % off, lightly re-encoded ones (uint8, ±2 grey-level noise, JPEG 90+)
1 %; photo crops 99 %, rotated/mirrored/inverted digits 57 %, random affine
variants of MNIST digits 14 %, of scikit-learn's digits 7 %, scikit-learn's
digits themselves 0 %; Square's ±0.3 stripes, HopSkipJump's noise blends and
±0.1 sign noise (JbDA's synthetic steps) 100 %. So it catches thieves whose
pool or augmentation leaves the data manifold, and query-based evasion once
its probes do; a thief who queries only natural in-distribution digits is
invisible to it (and to every per-query test).

Calibrated at 0.001 on the demo's benign sequences (72 clients, the
calibration split) the threshold is about 20 nats; 72 held-out benign
clients (up to 3,000 queries each) peaked at 2.5–6.5. The threshold is set
by a few calibration clients re-sending an odd digit several times, which
counts each time. The KnockoffNets pool of ``tfshield eval extraction``
(5,000 digits, 25 per call) is flagged after 525–725 queries, Square-like
±0.3 stripes (one per call) after 5–10, photo crops within the first call;
``query_fpr`` 0.003–0.03 and ``prior_queries`` 10–40 gave about the same.

Cost per sample: two (d × k) products (the Mahalanobis score, float32);
state: two float32 counts and a time per client.
"""

from __future__ import annotations

import math
from typing import Self

import numpy as np

from detectors.base import DetectorError, Predictor, register, threshold_at_fpr
from detectors.mahalanobis import LEARNED_ARRAYS, MahalanobisDetector, mahalanobis_scores
from detectors.monitor import Monitor, MonitorResult, QueryBatch
from gateway.store import Store

__all__ = ["OodRate", "rate_surprise"]


def rate_surprise(n: float, k: float, p0: float) -> float:
    """``n · KL(k/n ‖ p0)`` in nats when ``k/n > p0``, else 0 (Bernoulli KL divergence)."""
    if n <= 0.0 or not 0.0 < p0 < 1.0:
        return 0.0
    rate = min(max(k / n, 0.0), 1.0)
    if rate <= p0:
        return 0.0
    divergence = rate * math.log(rate / p0)
    if rate < 1.0:
        divergence += (1.0 - rate) * math.log((1.0 - rate) / (1.0 - p0))
    return n * divergence


@register
class OodRate(Monitor):
    """Binomial surprise of a client's rate of off-distribution queries (Mahalanobis per query).

    Hyperparameters: ``n_components`` (default 50) and ``variance_floor``
    (default 1e-3) of the per-query Mahalanobis score; ``query_fpr`` (in
    (0, 0.5), default 0.003), the fraction of benign queries counted as off;
    ``prior_queries`` (≥ 0, default 10), pseudo-queries at the benign rate;
    ``half_life_s`` (of the counts, default 3600); ``state_ttl_s`` (default 86400).

    Learned: by ``fit`` the Mahalanobis arrays (``mean_``, ``components_``,
    ``component_weights_``, ``residual_weights_``, float32); by calibration
    ``query_threshold_``, ``null_rate_`` and ``threshold_``.

    Score: the surprise above, in nats, ≥ 0; flagged above ``threshold_``.
    """

    name = "ood_rate"
    params = ("n_components", "variance_floor", "query_fpr", "prior_queries", "half_life_s", "state_ttl_s")
    flags_when = "above"
    max_state_bytes = 128

    mean_: np.ndarray
    components_: np.ndarray
    component_weights_: np.ndarray
    residual_weights_: np.ndarray
    query_threshold_: float
    null_rate_: float

    def __init__(
        self,
        n_components: int = 50,
        variance_floor: float = 1e-3,
        query_fpr: float = 0.003,
        prior_queries: float = 10.0,
        half_life_s: float = 3600.0,
        state_ttl_s: float = 86400.0,
    ) -> None:
        MahalanobisDetector(n_components, variance_floor)  # validates both
        if not 0.0 < query_fpr < 0.5:
            raise DetectorError(f"ood_rate: query_fpr must be in (0, 0.5), got {query_fpr}")
        if not prior_queries >= 0.0:
            raise DetectorError(f"ood_rate: prior_queries must be >= 0, got {prior_queries}")
        if not half_life_s > 0 or not state_ttl_s > 0:
            raise DetectorError("ood_rate: half_life_s and state_ttl_s must be > 0")
        self.n_components = int(n_components)
        self.variance_floor = float(variance_floor)
        self.query_fpr = float(query_fpr)
        self.prior_queries = float(prior_queries)
        self.half_life_s = float(half_life_s)
        self.state_ttl_s = float(state_ttl_s)

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        inner = MahalanobisDetector(self.n_components, self.variance_floor).fit(x_ref)
        for name in LEARNED_ARRAYS:
            setattr(self, name, getattr(inner, name).astype(np.float32))

    def _state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in LEARNED_ARRAYS}

    def _scalars(self) -> dict[str, float | int | str]:
        return {"query_threshold_": self.query_threshold_, "null_rate_": self.null_rate_}

    def query_scores(self, x: np.ndarray) -> np.ndarray:
        """Per-query Mahalanobis scores of flat samples (n, d) (``QueryBatch.x``)."""
        flat = np.asarray(x, dtype=np.float32)
        flat = flat.reshape(len(flat), math.prod(flat.shape[1:]))
        if flat.shape[1] != self.mean_.shape[0]:
            raise DetectorError(
                f"ood_rate: samples have {flat.shape[1]} features; it was fitted on {self.mean_.shape[0]}"
            )
        return mahalanobis_scores(
            flat, self.mean_, self.components_, self.component_weights_, self.residual_weights_
        )

    def _learn_from_benign(self, batches: list[list[QueryBatch]]) -> None:
        queries = [batch.x for sequence in batches for batch in sequence if len(batch.x)]
        if not queries:
            raise DetectorError("ood_rate: calibration needs benign queries")
        scores = self.query_scores(np.concatenate(queries))
        finite = scores[np.isfinite(scores)]
        if finite.size == 0:
            raise DetectorError("ood_rate: every benign query holds NaN or Inf; check the reference data")
        self.query_threshold_ = threshold_at_fpr(finite, self.query_fpr)
        # The benign rate as measured (ties can make it smaller than query_fpr), never 0.
        self.null_rate_ = float(max(np.mean(scores > self.query_threshold_), 1.0 / scores.size))

    def calibrate_batches(self, batches: list[list[QueryBatch]], fpr: float) -> Self:
        """The replay's threshold, but never below ``ln(1 / fpr)`` nats.

        By the Chernoff bound a client with the benign rate reaches a surprise
        of ``t`` after any given number of queries with probability at most
        ``e^-t``, so that floor keeps each look's false alarms under ``fpr``
        when the benign replay is too short to show any off query (a threshold
        near 0 would flag a client for one odd input).
        """
        super().calibrate_batches(batches, fpr)
        self.threshold_ = max(self.threshold_, math.log(1.0 / fpr))
        return self

    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        if not hasattr(self, "query_threshold_"):
            raise DetectorError("ood_rate: no benign query threshold; call calibrate() first")
        off = float(np.count_nonzero(self.query_scores(batch.x) > self.query_threshold_))
        key = self.key(client)
        (blob,) = await store.get_many([key])
        state = self._decode(blob)
        counts = np.zeros(2, dtype=np.float32)
        if state is not None and state.get("counts", counts).shape == (2,) and "t" in state:
            elapsed = max(0.0, now - float(state["t"]))
            counts = state["counts"].astype(np.float32) * np.float32(0.5 ** (elapsed / self.half_life_s))
        counts += np.array([len(batch.x), off], dtype=np.float32)
        blob = self._encode({"counts": counts, "t": np.float64(now)})
        await store.set_many([(key, blob)], self.state_ttl_s)
        prior = self.prior_queries
        score = rate_surprise(
            float(counts[0]) + prior, float(counts[1]) + prior * self.null_rate_, self.null_rate_
        )
        return self._result(score)
