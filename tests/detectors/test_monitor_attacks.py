"""Attack-like query sequences are flagged, benign clients are not (real MNIST digits, seeded).

The monitors are calibrated on benign clients drawn from the validation split
(``tests.detectors.monitor_fixtures``) and checked here on clients drawn from
the test split: ordinary users, a heavy user (1,500 queries, every digit re-sent
exactly) and users re-sending digits with light re-encodings. The attacks are
synthetic imitations (see the fixtures module); the evaluation runs the real ones.

What each monitor is for, and what these tests pin down:

===============  =========================================  ==================================
monitor          flags                                      within
===============  =========================================  ==================================
blacklight       HopSkipJump-like, SimBA-like walks         50 queries
knn              HopSkipJump-like, SimBA-like walks         50 queries
prada            Papernot/JbDA-like augmentation             300 queries
class_coverage   uniform-noise probing (one class)           100 queries
ood_rate         Square-like ±0.3 stripes, rotated or        25 queries
                 inverted digits, JbDA-like steps            50 queries
===============  =========================================  ==================================
"""

from __future__ import annotations

import numpy as np
import pytest

from detectors.monitor import Monitor, run_sync
from gateway.store import MemoryStore
from tests.detectors.monitor_fixtures import (
    MonitorWorld,
    benign_test_clients,
    hsj_like,
    jbda_like,
    monitor_world,
    noise_queries,
    simba_like,
)

SEQUENCE_MONITORS = ("blacklight", "knn", "ood_rate", "prada", "class_coverage")


@pytest.fixture(scope="module")
def world() -> MonitorWorld:
    return monitor_world()


async def queries_to_detection(
    world: MonitorWorld, m: Monitor, requests: list[np.ndarray], store=None, client: str = "mallory"
) -> int | None:
    """Samples sent until the first flagged response (None: never flagged)."""
    return await detection_in_batches(
        m, [world.batches(r, batch_size=len(r))[0] for r in requests], store, client
    )


async def detection_in_batches(m: Monitor, batches: list, store=None, client: str = "mallory") -> int | None:
    store = store if store is not None else MemoryStore()
    sent = 0
    for i, batch in enumerate(batches):
        sent += len(batch.x)
        if (await m.observe(store, client, batch, now=1000.0 + 0.05 * i)).flagged:
            return sent
    return None


@pytest.fixture(scope="module")
def benign_verdicts(world) -> dict[str, dict[str, bool]]:
    """Whether each monitor ever flagged each held-out benign client (all sharing one store)."""

    async def run() -> dict[str, dict[str, bool]]:
        store = MemoryStore()
        clients = benign_test_clients(world.mnist.x_test, seed=7)
        verdicts: dict[str, dict[str, bool]] = {name: {} for name in SEQUENCE_MONITORS}
        for client, queries in clients.items():
            batches = world.batches(queries)  # embedded and predicted once, one query per request
            for name in SEQUENCE_MONITORS:
                detected = await detection_in_batches(world.suite.monitors[name], batches, store, client)
                verdicts[name][client] = detected is not None
        return verdicts

    return run_sync(run())  # a MemoryStore never suspends


@pytest.mark.parametrize("name", SEQUENCE_MONITORS)
def test_no_held_out_benign_client_is_flagged(name, benign_verdicts):
    flagged = [client for client, was in benign_verdicts[name].items() if was]
    assert flagged == []
    assert {"heavy", "resend-0", "random-0"} <= set(benign_verdicts[name])


@pytest.mark.parametrize("name", ["blacklight", "knn"])
@pytest.mark.parametrize("digit", [0, 1, 2])
async def test_a_hopskipjump_like_walk_is_flagged_within_50_queries(name, digit, world):
    rng = np.random.default_rng(digit)
    requests = hsj_like(world.mnist.x_test[digit], rng, n=300)
    detected = await queries_to_detection(world, world.suite.monitors[name], requests)
    assert detected is not None and detected <= 50, detected


@pytest.mark.parametrize("name", ["blacklight", "knn"])
@pytest.mark.parametrize("digit", [3, 4, 5])
async def test_a_simba_like_walk_is_flagged_within_50_queries(name, digit, world):
    rng = np.random.default_rng(digit)
    queries = simba_like(world.mnist.x_test[digit], rng, n=200)
    detected = await detection_in_batches(world.suite.monitors[name], world.batches(queries))
    assert detected is not None and detected <= 50, detected


@pytest.mark.parametrize(("name", "within"), [("prada", 300), ("ood_rate", 50)])
@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_papernot_like_augmentation_is_flagged(name, within, seed, world):
    rng = np.random.default_rng(seed)
    seeds = world.mnist.x_validation[rng.choice(len(world.mnist.x_validation), 10, replace=False)]
    queries = jbda_like(seeds, rng, n=640)
    detected = await detection_in_batches(world.suite.monitors[name], world.batches(queries))
    assert detected is not None and detected <= within, detected


@pytest.mark.parametrize("seed", [0, 1])
async def test_noise_probing_is_flagged_by_class_coverage_within_100_queries(seed, world):
    queries = noise_queries(np.random.default_rng(seed), 300)
    detected = await detection_in_batches(world.suite.monitors["class_coverage"], world.batches(queries))
    assert detected is not None and detected <= 100, detected


async def test_benign_re_sends_of_one_digit_are_not_hits_when_exact(world):
    """Re-sending the very same digit (even 50 times, from many clients) never counts for Blacklight."""
    m = world.suite.monitors["blacklight"]
    store = MemoryStore()
    digit = world.mnist.x_test[9][None]
    for i in range(50):
        (batch,) = world.batches(digit)
        result = await m.observe(store, f"client-{i % 5}", batch, now=float(i))
        assert result.score == 0.0


def square_like(x0: np.ndarray, rng: np.random.Generator, n: int, epsilon: float = 0.3) -> np.ndarray:
    """Square attack's start (L∞): ±ε vertical stripes on the digit, then ±2ε squares moved at random."""
    current = np.clip(x0 + epsilon * np.sign(rng.normal(size=(1, x0.shape[1], 1))), 0, 1)
    out = [x0, current]
    while len(out) < n:
        side = int(rng.integers(2, 8))
        top, left = rng.integers(0, x0.shape[0] - side, size=2)
        candidate = current.copy()
        delta = 2 * epsilon * np.sign(rng.normal())
        candidate[top : top + side, left : left + side] = np.clip(
            x0[top : top + side, left : left + side] + delta / 2, 0, 1
        )
        out.append(candidate)
        if rng.random() < 0.5:
            current = candidate
    return np.stack(out).astype(np.float32)


def copycat_like(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out-of-domain digits: rotated by 90/180/270°, half mirrored, half inverted."""
    out = []
    for image in digits:
        image = np.rot90(image, k=int(rng.integers(1, 4)), axes=(0, 1))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        out.append(1.0 - image if rng.random() < 0.5 else image)
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("digit", [0, 1, 2])
async def test_square_like_probing_is_flagged_by_ood_rate_within_25_queries(digit, world):
    queries = square_like(world.mnist.x_test[digit], np.random.default_rng(digit), n=200)
    detected = await detection_in_batches(world.suite.monitors["ood_rate"], world.batches(queries))
    assert detected is not None and detected <= 25, detected


@pytest.mark.parametrize("seed", [0, 1])
async def test_out_of_domain_digits_are_flagged_by_ood_rate_within_25_queries(seed, world):
    rng = np.random.default_rng(seed)
    digits = world.mnist.x_test[rng.choice(len(world.mnist.x_test), 200, replace=False)]
    queries = copycat_like(digits, rng)
    detected = await detection_in_batches(world.suite.monitors["ood_rate"], world.batches(queries, 5))
    assert detected is not None and detected <= 25, detected
