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
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from detectors.base import Detector, Predictor
from gateway.store import Store


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


class Monitor(Detector):
    """Base class of monitors. ``score``/``detect`` of the Detector contract do
    not apply to sequences: monitors implement ``observe`` instead, and
    ``calibrate`` replays benign sequences."""

    # Upper bound of the state one client costs in the store, bytes.
    max_state_bytes: ClassVar[int] = 0
    # True when observe needs ``predicted`` (runs after the response).
    needs_prediction: ClassVar[bool] = False

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
