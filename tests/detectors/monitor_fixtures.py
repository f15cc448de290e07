"""Shared data for the monitor tests: calibrated monitors, benign clients and attack-like sequences.

Calibration replays benign clients drawn from the validation split (as
``tfshield calibrate`` does, fewer and shorter so the tests stay fast);
checks use clients drawn from the test split with other seeds. The protected
model is the numpy classifier of ``tests.detectors.conftest`` (about 91 %
test accuracy). Everything is computed once per process (``functools.cache``)
because several test modules share it.

Attack-like sequences are seeded, synthetic imitations of what the real
attacks send (the evaluation runs the real ones through the gateway):

- :func:`hsj_like`: HopSkipJump's pattern: a random start, a binary search
  towards the original, then batches of tiny random probes around the
  boundary point, which moves a little after each batch;
- :func:`simba_like`: SimBA (pixel basis): one pixel ± ε per query from the
  current image, kept when it "helps" (here: at random);
- :func:`jbda_like`: Papernot et al.'s Jacobian-based augmentation from a
  few seeds: every round adds a λ = 0.1 sign step from every point so far
  (a random sign pattern stands in for the substitute's gradient);
- :func:`noise_queries`: uniform noise, the crudest extraction probe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from detectors.embedding import Embedding
from detectors.monitor import QueryBatch, prepare_batches
from detectors.monitor_calibration import MonitorSuite, benign_sequences, calibrate_monitors, reencode_lightly
from gateway.model.data import MnistSplit, split_mnist
from tests.detectors.conftest import fit_classifier

CALIBRATION_FPR = 0.001
SECRET = "test-salt"


@dataclass(frozen=True, eq=False)
class MonitorWorld:
    mnist: MnistSplit
    suite: MonitorSuite
    predict_proba: object

    def predicted(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_proba(batch.reshape(len(batch), 28, 28, 1)).argmax(axis=1)  # type: ignore[operator]

    def batches(self, sequence: np.ndarray, batch_size: int = 1) -> list[QueryBatch]:
        return prepare_batches(sequence, self.suite.embedding.transform, self.predicted, batch_size)

    @property
    def embedding(self) -> Embedding:
        return self.suite.embedding


@functools.cache
def monitor_world() -> MonitorWorld:
    mnist = split_mnist()
    predict_proba = fit_classifier(mnist.x_train, mnist.y_train)

    def predicted(batch: np.ndarray) -> np.ndarray:
        return predict_proba(batch.reshape(len(batch), 28, 28, 1)).argmax(axis=1)

    calibration = benign_sequences(
        mnist.x_validation,
        np.random.default_rng(100),
        n_random=16,
        n_heavy=2,
        n_resend=10,
        random_length=(50, 300),
        heavy_length=(1000, 1500),
        resend_length=(100, 300),
    )
    suite = calibrate_monitors(mnist.x_train, calibration, CALIBRATION_FPR, predicted, secret=SECRET)
    return MonitorWorld(mnist, suite, predict_proba)


def benign_test_clients(pool: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Held-out benign clients of every kind, from ``pool`` (the test split)."""
    rng = np.random.default_rng(seed)
    clients = {f"random-{i}": pool[rng.integers(0, len(pool), 300)] for i in range(6)}
    clients["heavy"] = pool[rng.integers(0, len(pool), 1500)]
    for i in range(4):
        queries: list[np.ndarray] = []
        while len(queries) < 200:
            original = pool[rng.integers(len(pool))]
            queries += [original] + [reencode_lightly(original, rng) for _ in range(int(rng.integers(0, 6)))]
        clients[f"resend-{i}"] = np.stack(queries[:200])
    return clients


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def hsj_like(x0: np.ndarray, rng: np.random.Generator, n: int, probes: int = 32) -> list[np.ndarray]:
    """HopSkipJump-like requests (a list of batches) around ``x0`` (28, 28, 1)."""
    start = rng.uniform(0.0, 1.0, x0.shape).astype(np.float32)
    requests: list[np.ndarray] = [start[None]]
    low, high = 0.0, 1.0
    for _ in range(12):  # binary search on the blend towards the original
        mid = (low + high) / 2
        requests.append(_clip((1 - mid) * start + mid * x0)[None])
        low, high = (mid, high) if rng.random() < 0.5 else (low, mid)
    boundary = _clip((1 - low) * start + low * x0)
    while sum(len(r) for r in requests) < n:
        directions = rng.normal(size=(probes, *x0.shape))
        directions /= np.linalg.norm(directions.reshape(probes, -1), axis=1)[:, None, None, None]
        requests.append(_clip(boundary + 0.05 * directions))  # gradient-estimation probes
        boundary = _clip(boundary + 0.02 * (x0 - boundary) + 0.01 * directions[0])
        requests.append(boundary[None])
    return requests


def simba_like(x0: np.ndarray, rng: np.random.Generator, n: int, epsilon: float = 0.2) -> np.ndarray:
    current = x0.copy()
    queries = []
    for _ in range(n):
        candidate = current.copy()
        pixel = np.unravel_index(rng.integers(candidate.size), candidate.shape)
        candidate[pixel] = np.clip(candidate[pixel] + rng.choice([-epsilon, epsilon]), 0.0, 1.0)
        queries.append(candidate)
        if rng.random() < 0.5:
            current = candidate
    return np.stack(queries).astype(np.float32)


def jbda_like(seeds: np.ndarray, rng: np.random.Generator, n: int, step: float = 0.1) -> np.ndarray:
    points = [s for s in seeds]
    queries = list(seeds)
    while len(queries) < n:
        augmented = [_clip(p + step * np.sign(rng.normal(size=p.shape))) for p in points]
        queries += augmented
        points += augmented
    return np.stack(queries[:n]).astype(np.float32)


def noise_queries(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.0, 1.0, (n, 28, 28, 1)).astype(np.float32)
