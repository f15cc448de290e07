"""Query-based evasion: how close a client's queries sit to its own earlier ones.

Paper: Chen, Carlini, Wagner, "Stateful Detection of Black-Box Adversarial
Attacks", ACM SPAI 2020 (arXiv 1907.05587, 2019). An attack that estimates
gradients or walks along the decision boundary sends many queries close to
each other; benign users' queries are spread over the data. For every query
the detector takes the mean distance to the ``k`` nearest of the client's
previous queries, in a compact embedding, and flags the client when it falls
below a threshold set on benign traffic.

Here: the embedding is the shared PCA (``QueryBatch.embedding``, the first
``n_dims`` columns; the paper trains a similarity encoder), and the history
is the client's last ``history`` queries (oldest out), float16: memory and
cost per query are bounded, and an attacker's queries are recent by nature.

Exact duplicates. A query whose content is the same image as a stored one
(8-bit resolution, :func:`detectors.monitor.content_digests`) is neither
compared with that copy nor stored again: re-sending an input gives an
attacker nothing new, while a benign user re-sending a digit five times would
otherwise put four zero distances among its k nearest neighbours. Lightly
re-encoded copies (noise, JPEG) are different images and count, which is why
``k`` (20) is well above the number of times a benign user re-sends one input
(up to 8 in calibration, :mod:`detectors.monitor_calibration`): with k = 10
such users set the threshold at a third of what it is with k = 20, for the
same detection of attacks within 50 queries.

Measured offline on MNIST (ART attacks against the demo CNN, calibrated at
0.001): HopSkipJump flagged after 22 queries, Boundary after 23, SimBA after
21 (DCT) to 39 (pixels); uniform-noise probes are close to each other in
the embedding too. Square attack (ε = 0.3, ART defaults) is not: its steps
are large, and it succeeds within ~40 queries; the input detectors see its
±0.3 stripes.

Score: the smallest mean k-NN distance over the samples of this request (in
embedding units), NaN until the client has ``k`` distinct earlier queries;
flagged below ``threshold_``.

Cost per sample: distances to at most ``history`` vectors of ``n_dims``
(64 × 24 by default) and a partial sort; state ``history × (2 n_dims + 4)``
bytes plus a header (about 3.4 KB by default).
"""

from __future__ import annotations

import numpy as np

from detectors.base import DetectorError, register
from detectors.monitor import Monitor, MonitorResult, QueryBatch, content_digests
from gateway.store import Store

__all__ = ["StatefulKNN"]


@register
class StatefulKNN(Monitor):
    """Mean distance to the k nearest of a client's recent distinct queries.

    Hyperparameters: ``k`` (int ≥ 1, default 20), ``history`` (int ≥ k,
    queries kept per client, default 64), ``n_dims`` (embedding columns used,
    default 24), ``state_ttl_s`` (seconds a silent client is remembered,
    default 86400).
    """

    name = "knn"
    params = ("k", "history", "n_dims", "state_ttl_s")
    needs_embedding = True
    flags_when = "below"

    def __init__(
        self, k: int = 20, history: int = 64, n_dims: int = 24, state_ttl_s: float = 86400.0
    ) -> None:
        for label, value in (("k", k), ("history", history), ("n_dims", n_dims)):
            if int(value) != value or value < 1:
                raise DetectorError(f"knn: {label} must be an integer >= 1, got {value}")
        if history < k:
            raise DetectorError(f"knn: history ({history}) must be >= k ({k})")
        if not state_ttl_s > 0:
            raise DetectorError(f"knn: state_ttl_s must be > 0, got {state_ttl_s}")
        self.k = int(k)
        self.history = int(history)
        self.n_dims = int(n_dims)
        self.state_ttl_s = float(state_ttl_s)

    @property
    def max_state_bytes(self) -> int:  # type: ignore[override]
        return self.history * (2 * self.n_dims + 4) + 128

    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        embedding = np.asarray(batch.embedding, dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[1] < self.n_dims:
            raise DetectorError(
                f"knn: needs at least {self.n_dims} embedding columns, got shape {embedding.shape}"
            )
        embedding = embedding[:, : self.n_dims]
        digests = (content_digests(batch.x) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        key = self.key(client)
        (blob,) = await store.get_many([key])
        state = self._decode(blob)
        vectors = np.zeros((self.history, self.n_dims), dtype=np.float16)
        stored_digests = np.zeros(self.history, dtype=np.uint32)
        stored = 0
        if (
            state is not None
            and state.get("vectors", vectors).shape == vectors.shape
            and state.get("digests", stored_digests).shape == stored_digests.shape
        ):
            vectors, stored_digests = state["vectors"], state["digests"]
            stored = int(state.get("stored", np.int64(0)))

        best = np.nan
        as_float = vectors.astype(np.float32)
        for i in range(len(embedding)):
            valid = min(stored, self.history)
            same = stored_digests[:valid] == digests[i]
            candidates = as_float[:valid][~same]
            if len(candidates) >= self.k:
                distances = np.sqrt(((candidates - embedding[i]) ** 2).sum(axis=1))
                mean = float(np.partition(distances, self.k - 1)[: self.k].mean())
                best = mean if np.isnan(best) else min(best, mean)
            if not same.any():
                slot = stored % self.history
                vectors[slot] = embedding[i]
                as_float[slot] = vectors[slot]
                stored_digests[slot] = digests[i]
                stored += 1

        state_blob = self._encode({"vectors": vectors, "digests": stored_digests, "stored": np.int64(stored)})
        await store.set_many([(key, state_blob)], self.state_ttl_s)
        return self._result(best)
