"""The monitor contract: a detector with memory, keyed by client.

A query alone looks benign; the sequence of a client's queries does not. A
monitor watches each client's sequence and answers, after every query, how
suspicious that client now is.

- Hyperparameters are keyword arguments stored unchanged (``params``); learned
  state ends in ``_`` and is set only by ``fit``/``calibrate`` (as for detectors).
- ``fit(x_ref)`` learns what it needs from benign reference samples (for
  example an embedding); ``calibrate(benign_sequences, fpr)`` replays benign
  clients' query sequences and sets ``threshold_`` so that at most ``fpr`` of
  benign clients are ever flagged, never by hand.
- ``observe(store, client, batch, now)`` updates the client's state in the
  store and returns a :class:`MonitorResult`; per-client state is bounded
  (``max_state_bytes``) and the cost of one call does not grow with the
  number of past queries.
- ``reset(store, client)`` forgets a client.
- Saved and loaded like detectors (``.npz`` + JSON, never pickle), through
  the same ``Detector.save``/``load`` machinery.

State lives in a :class:`gateway.store.Store` passed in, so the same monitor
runs on the in-memory store and on Redis (tests run every monitor on both).
Keys are ``tfs:<monitor>:<client>`` (per client) or ``tfs:<monitor>:g:<...>``
(global, e.g. the fingerprint index); ``client_keys`` lists a client's keys.

Per-client state is encoded with :mod:`detectors.statecodec` (never pickle);
a blob that does not decode (corrupt, truncated, written by something else)
is treated as a fresh client and counted in ``corrupt_states_total``.

Every ``MonitorResult`` carries ``risk`` in [0, 1], higher = more suspicious,
0.5 exactly at the calibrated threshold (see :func:`ratio_risk`), so the
client risk (:mod:`detectors.risk`) can combine monitors whose own scores
point in different directions. A rate limit is not a statistical verdict: it
says ``rate_limited=True`` (RESOURCE_EXHAUSTED) with ``flagged=False`` and risk 0,
so volume alone never raises a client's risk.
"""

from __future__ import annotations

import hashlib
import math
from abc import abstractmethod
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, TypeVar

import numpy as np

from detectors.base import Detector, DetectorError, NotCalibrated, Predictor, threshold_at_fpr
from detectors.statecodec import StateError, decode_state, encode_state
from gateway.store import MemoryStore, Store

T = TypeVar("T")
# Maps a batch of inputs (n, ...) to the model's top-1 classes (n,) int.
PredictedFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class QueryBatch:
    """What a monitor sees of one request.

    ``x``: the request's samples, flattened to (n, features), float32.
    ``embedding``: (n, d) float32, the shared compact embedding of ``x`` (see
    ``detectors.embedding``), computed once per request for every monitor.
    ``predicted``: (n,) int, the model's top-1 class per sample, or None when the
    monitor runs before the response is known.
    """

    x: np.ndarray
    embedding: np.ndarray
    predicted: np.ndarray | None = None


@dataclass(frozen=True)
class MonitorResult:
    monitor: str
    # The monitor's own statistic for this client after this query (documented per monitor).
    score: float
    flagged: bool
    # Suspicion in [0, 1] derived from the score relative to the threshold; feeds client risk.
    risk: float
    # The client is over its rate limit: refuse with RESOURCE_EXHAUSTED. Never a statistical
    # flag (``flagged`` stays False, ``risk`` 0): volume alone is not evidence of an attack.
    rate_limited: bool = False


def ratio_risk(ratio: float, steepness: float = 4.0) -> float:
    """Risk in [0, 1] from ``ratio`` = how far a score is towards its threshold (1 = at it).

    ``r^s / (1 + r^s)``: 0 at ratio 0, 0.5 at the threshold, about 0.06 at half
    of it and 0.94 at twice it (steepness 4). NaN counts as 0.
    """
    if not ratio > 0.0:
        return 0.0
    if ratio > 1e6:
        return 1.0
    power = ratio**steepness
    return float(power / (1.0 + power))


def content_digests(x: np.ndarray, key: bytes = b"") -> np.ndarray:
    """One 64-bit digest per sample of its content at 8-bit resolution, (n,) uint64.

    Two samples get the same digest when they are the same image once scaled
    by 255 and rounded, so a float → uint8 → float round trip (or any jitter
    below half a grey level) is still "the same query", and anything larger is
    a different one. ``key`` makes digests unpredictable (Blacklight's salt).
    """
    flat = np.asarray(x, dtype=np.float32)
    flat = flat.reshape(len(flat), math.prod(flat.shape[1:]))
    levels = np.rint(np.clip(flat, -128.0, 128.0) * np.float32(255.0)).astype(np.int16)
    out = np.empty(len(flat), dtype=np.uint64)
    key = key[:64]
    for i in range(len(levels)):
        digest = hashlib.blake2b(levels[i].data, digest_size=8, key=key).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (monitors on a MemoryStore) without an event loop.

    Calibration replays thousands of queries through ``observe`` on a
    MemoryStore, whose operations complete without awaiting anything; driving
    the coroutine by hand works inside or outside a running loop (``tfshield
    calibrate`` and async tests alike). A coroutine that does suspend is a bug here.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise DetectorError("run_sync: the coroutine suspended; replay only against a MemoryStore")


class Monitor(Detector):
    """Base class of monitors. ``score``/``detect`` of the Detector contract do
    not apply to sequences: monitors implement ``observe`` instead, and
    ``calibrate`` replays benign sequences.

    A subclass implements ``observe`` (and ``_fit`` if it learns anything from
    reference data), sets ``flags_when`` to say which way its score points,
    and may override ``_learn_from_benign`` to learn more than a threshold
    from the benign replay (the class prior, a duplicate radius).
    """

    # Upper bound of the state one client costs in the store, bytes.
    max_state_bytes: ClassVar[int] = 0
    # True when observe needs ``predicted`` (runs after the response).
    needs_prediction: ClassVar[bool] = False
    # True when observe reads ``batch.embedding``.
    needs_embedding: ClassVar[bool] = False
    # "above": flagged when score > threshold_ (e.g. a count);
    # "below": flagged when score < threshold_ (e.g. a distance).
    flags_when: ClassVar[Literal["above", "below"]] = "above"

    # Blobs that failed to decode and were replaced by a fresh state (export as a metric).
    corrupt_states_total: int = 0

    def key(self, client: str) -> str:
        return f"tfs:{self.name}:{client}"

    def client_keys(self, client: str) -> list[str]:
        return [self.key(client)]

    @abstractmethod
    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        """Update ``client``'s state with this query; return the verdict after it."""

    async def reset(self, store: Store, client: str) -> None:
        await store.delete(self.client_keys(client))

    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        raise TypeError(f"monitor '{self.name}' scores query sequences: use observe(), not score()")

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        """Most monitors learn nothing from single samples; they learn in ``calibrate``."""

    # -- state helpers -------------------------------------------------------------

    def _decode(self, blob: bytes | None) -> dict[str, np.ndarray] | None:
        """The client's arrays, or None for a new client or a blob that does not decode (counted)."""
        if blob is None:
            return None
        try:
            return decode_state(blob, self.max_state_bytes)
        except StateError:
            self.corrupt_states_total += 1
            return None

    def _encode(self, arrays: Mapping[str, np.ndarray | np.generic]) -> bytes:
        blob = encode_state(arrays)
        if len(blob) > self.max_state_bytes:  # a bug, never the client's doing
            raise DetectorError(
                f"{self.name}: state of {len(blob)} bytes exceeds max_state_bytes {self.max_state_bytes}"
            )
        return blob

    # -- verdicts --------------------------------------------------------------------

    def _result(self, score: float) -> MonitorResult:
        """Flag and risk of ``score`` against ``threshold_`` (no threshold yet: never flagged)."""
        if not self.calibrated or not np.isfinite(score):
            return MonitorResult(self.name, float(score), False, 0.0)
        if self.flags_when == "above":
            flagged = score > self.threshold_
            ratio = score / self.threshold_ if self.threshold_ > 0 else (np.inf if score > 0 else 0.0)
        else:
            flagged = score < self.threshold_
            ratio = self.threshold_ / score if score > 0 else np.inf
        return MonitorResult(self.name, float(score), bool(flagged), ratio_risk(float(ratio)))

    # -- calibration -----------------------------------------------------------------

    def calibrate(  # type: ignore[override]
        self,
        benign_sequences: Sequence[np.ndarray],
        fpr: float,
        *,
        embed: Callable[[np.ndarray], np.ndarray] | None = None,
        predicted_fn: PredictedFn | None = None,
        batch_size: int = 1,
    ) -> Self:
        """Replay benign clients and set ``threshold_`` so at most ``fpr`` of them are ever flagged.

        ``benign_sequences``: one array of queries (q, ...) per benign client.
        Every client's sequence is replayed through ``observe`` in requests of
        ``batch_size`` samples, all clients interleaved round-robin in one
        MemoryStore (so shared state such as Blacklight's index sees them all),
        and the client's most suspicious score over its whole sequence is
        kept; the threshold is the ``fpr`` quantile of those, extrapolated
        when ``fpr`` is below a few clients' worth (see
        :func:`threshold_at_client_fpr`; 0.001 is a good target: about 1 in
        73 new benign clients exceeds the largest of 72 benign scores, which
        makes false alarms likely among 50 clients and 4 monitors). ``embed`` maps a batch to
        ``QueryBatch.embedding`` (``detectors.embedding.Embedding.transform``)
        and ``predicted_fn`` a batch to its top-1 classes.
        """
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"{self.name}: fpr must be in (0, 1), got {fpr}")
        if not self.fitted:
            raise NotCalibrated(f"monitor '{self.name}' is not fitted; call fit(x_ref) first")
        if len(benign_sequences) == 0:
            raise DetectorError(f"{self.name}: calibrate needs at least one benign sequence")
        if self.needs_prediction and predicted_fn is None:
            raise DetectorError(
                f"monitor '{self.name}' needs predicted classes: pass predicted_fn=batch -> classes"
            )
        if self.needs_embedding and embed is None:
            raise DetectorError(f"monitor '{self.name}' reads embeddings: pass embed=Embedding.transform")
        batches = [prepare_batches(seq, embed, predicted_fn, batch_size) for seq in benign_sequences]
        return self.calibrate_batches(batches, fpr)

    def calibrate_batches(self, batches: list[list[QueryBatch]], fpr: float) -> Self:
        """``calibrate`` on sequences already cut into QueryBatches (see :func:`prepare_batches`)."""
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"{self.name}: fpr must be in (0, 1), got {fpr}")
        if not self.fitted:
            raise NotCalibrated(f"monitor '{self.name}' is not fitted; call fit(x_ref) first")
        self._learn_from_benign(batches)
        for attribute in ("threshold_", "target_fpr_"):
            self.__dict__.pop(attribute, None)
        worst = replay(self, batches)
        worst = worst[np.isfinite(worst)]
        if worst.size == 0:
            raise DetectorError(
                f"{self.name}: no benign sequence was long enough to be scored; replay longer sequences"
            )
        if self.flags_when == "above":
            self.threshold_ = threshold_at_client_fpr(worst, fpr)
        else:  # distances: extrapolate on a log scale, where their tail is close to exponential
            if np.any(worst <= 0):
                raise DetectorError(
                    f"{self.name}: benign clients scored <= 0; a 'below' score must be positive"
                )
            self.threshold_ = float(np.exp(-threshold_at_client_fpr(-np.log(worst), fpr)))
        self.target_fpr_ = float(fpr)
        return self

    def _learn_from_benign(self, batches: list[list[QueryBatch]]) -> None:
        """Learn what the replay needs besides the threshold (called before the replay)."""


def threshold_at_client_fpr(worst: np.ndarray, fpr: float, tail_fraction: float = 0.2) -> float:
    """A threshold that at most ``fpr`` of benign clients exceed, from their most suspicious scores.

    With n clients, the empirical quantile (:func:`detectors.base.threshold_at_fpr`)
    can only promise 1 / (n + 1): a new benign client exceeds the largest of
    n scores that often, and with several monitors and dozens of clients that
    is several false alarms. Below a handful of expected exceedances the
    threshold is extrapolated instead (peaks over threshold: the excesses of
    the top ``tail_fraction`` of clients over the next score ``u`` are taken
    as exponential, a generalised Pareto tail of shape 0, with mean ``e``), and
    the larger of the two is used::

        threshold = u + e · ln((k / n) / fpr),   k = the clients in the tail

    On MNIST (50 calibration clients, 150 held-out ones, fpr 0.001) this
    flagged none of the held-out clients with any monitor, where the
    empirical maximum flagged 1–6 % of them.
    """
    scores = np.sort(np.asarray(worst, dtype=np.float64))[::-1]
    empirical = threshold_at_fpr(scores, fpr)
    n = scores.size
    if fpr * n >= 5 or n < 10:
        return empirical
    k = max(5, int(round(tail_fraction * n)))
    k = min(k, n - 1)
    u = scores[k]
    excess = float(np.mean(scores[:k] - u))
    extrapolated = u + excess * math.log((k / n) / fpr)
    return float(max(empirical, extrapolated))


def prepare_batches(
    sequence: np.ndarray,
    embed: Callable[[np.ndarray], np.ndarray] | None,
    predicted_fn: PredictedFn | None,
    batch_size: int = 1,
) -> list[QueryBatch]:
    """Cut one client's queries (q, ...) into the QueryBatches the gateway would build."""
    sequence = np.asarray(sequence)
    flat = sequence.reshape(len(sequence), math.prod(sequence.shape[1:])).astype(np.float32, copy=False)
    embedding = embed(sequence) if embed is not None else np.zeros((len(sequence), 0), np.float32)
    predicted = np.asarray(predicted_fn(sequence)).astype(np.int64) if predicted_fn is not None else None
    out = []
    for start in range(0, len(sequence), batch_size):
        stop = start + batch_size
        out.append(
            QueryBatch(
                x=flat[start:stop],
                embedding=np.asarray(embedding[start:stop], dtype=np.float32),
                predicted=None if predicted is None else predicted[start:stop],
            )
        )
    return out


def replay(
    monitor: Monitor,
    clients: list[list[QueryBatch]],
    store: Store | None = None,
    seconds_per_request: float = 0.01,
) -> np.ndarray:
    """Each client's most suspicious score over its replayed sequence, (clients,) float64.

    Clients are interleaved round-robin, one request each per turn, on one
    store (a fresh MemoryStore by default) with a clock that advances
    ``seconds_per_request`` per request. "Most suspicious" is the maximum for
    ``flags_when == "above"`` monitors and the minimum otherwise; a client
    never scored (too few queries) gets -inf / +inf.
    """
    store = store if store is not None else MemoryStore(max_keys=1 << 62)
    above = monitor.flags_when == "above"
    worst = np.full(len(clients), -np.inf if above else np.inf)
    now = 0.0
    longest = max((len(c) for c in clients), default=0)
    for turn in range(longest):
        for index, batches in enumerate(clients):
            if turn >= len(batches):
                continue
            now += seconds_per_request
            result = run_sync(monitor.observe(store, f"client-{index}", batches[turn], now))
            if np.isfinite(result.score):
                worst[index] = max(worst[index], result.score) if above else min(worst[index], result.score)
    return worst
