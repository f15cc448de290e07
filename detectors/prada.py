"""Model extraction: PRADA's test of how a client's queries are spaced.

Paper: Juuti, Szyller, Marchal, Asokan, "PRADA: Protecting against DNN Model
Stealing Attacks", IEEE EuroS&P 2019. Benign queries are natural samples,
and the distance from each new one to the nearest earlier one (of the same
predicted class) is roughly normally distributed. Extraction attacks that
synthesise queries (Papernot et al.'s Jacobian-based augmentation, Tramèr et
al.'s line searches, random or crafted probes) produce distances that are
not: many tiny steps from seeds, or a few fixed step sizes. PRADA keeps, per
client and predicted class, a *growing set* of queries; for a new query of
class c it records the minimum L2 distance to that class's set, adds the
query to the set when that distance exceeds the class's running threshold
``T_c = max(T_c, mean − std of the distances that grew the set)``, and runs
a Shapiro–Wilk normality test on the recorded distances: an alarm when the
statistic W falls below δ.

Bounded here (the paper keeps everything):

- distances are measured in the shared embedding (``QueryBatch.embedding``,
  first ``n_dims`` columns), stored as float16;
- each class's growing set keeps its last ``max_per_class`` members
  (oldest out), so memory per client is ``n_classes × max_per_class × n_dims × 2``
  bytes and the cost of a query is ``max_per_class`` distances;
- the test runs on the last ``window`` recorded distances (a ring); the
  paper tests all of them, which costs O(queries) per query. A recent window
  also reacts to an attack that starts after a benign history.

Exact and near-exact duplicates: a query closer than ``duplicate_distance_``
(learned in calibration: ``duplicate_fraction`` × the median distance between
two benign queries) to one of the client's last ``recent`` queries, or to its
class's growing set, is not recorded at all. Re-sending or lightly
re-encoding an input gives an attacker no new information, and a benign user
who re-sends would otherwise feed the test the same distance several times
(the copies' distance to the growing set is the original's), a spike that
looks just like a synthetic extraction: on the bundled MNIST split, users
re-sending each digit up to 8 times went down to W ≈ 0.79 while plain users
stayed above 0.93. In the 16-dimensional embedding a re-encoding moves a digit
by 0.01–0.09 (Gaussian noise of 2 grey levels, JPEG at quality 90), Papernot's
λ = 0.1 steps by 0.2–0.9, and two digits are 7.75 apart (median), hence the
default fraction 0.018 (≈ 0.14).

The score is W turned into a standard normal deviate z by Royston's (1992)
normalisation (``ln(1 − W)`` is close to normal, with a mean and deviation
that depend on the number of values n), higher = less normal: the test's
p-value is 1 − Φ(z). A fixed δ on W means something else at 32 distances than
at 128 (W of 32 normal values scatters much more), so a client that had just
reached ``min_distances`` was flagged by a δ calibrated on long sequences;
with z one threshold fits every n. ``delta(n)`` gives the equivalent δ on W
(about 0.96 for 128 distances on MNIST). W and z are computed in numpy
(Royston's approximation of the coefficients, as ``scipy.stats.shapiro``
does, and tested against it), so the gateway needs no scipy.

z of benign clients is noisy (on MNIST about 1 ± 1 per test at 128
distances, the benign distances being only roughly normal) and a heavy user
takes thousands of tests, so its largest z grows with volume; a single high
z is not evidence. The score is therefore an exponential moving average of z
over about ``smoothing`` queries: an attack keeps z high, a benign spike
fades. (A forgetting running threshold T_c instead of PRADA's max changed
nothing measurable.)

Measured offline on MNIST (labels from the numpy test classifier, calibrated
at 0.001 on 72 benign clients): Papernot-style augmentation (λ = 0.1) from
10 seeds flagged after 40–47 queries; from 150 seeds after ~390 queries or
not at all: while the window holds only augmentation steps, which are evenly
spaced, their distances look normal again. Its ±0.1 steps are far off the
digit manifold, which the Mahalanobis detector flags on every such query.
Uniform noise, blobs and KnockoffNets-style natural queries are not flagged
by PRADA (as the paper reports for natural queries); the class coverage
monitor flags the first two.

Score: the moving average of z, NaN until ``min_distances`` distances were
recorded; flagged above ``threshold_`` (calibrated).
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np

from detectors.base import DetectorError, register
from detectors.monitor import Monitor, MonitorResult, QueryBatch
from gateway.store import Store

__all__ = ["Prada", "shapiro_wilk_w"]

_SMALL = 1e-19


@functools.lru_cache(maxsize=256)
def _shapiro_coefficients(n: int) -> np.ndarray:
    """Royston's (1992) coefficients a_1..a_n of the Shapiro–Wilk W for n ≥ 6 (AS R94)."""
    if n < 6:
        raise DetectorError(f"shapiro_wilk_w needs at least 6 values, got {n}")
    normal = NormalDist()
    m = np.array([normal.inv_cdf((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
    mm = float(m @ m)
    u = 1.0 / math.sqrt(n)
    c = m / math.sqrt(mm)
    an = c[-1] + 0.221157 * u - 0.147981 * u**2 - 2.071190 * u**3 + 4.434685 * u**4 - 2.706056 * u**5
    an1 = c[-2] + 0.042981 * u - 0.293762 * u**2 - 1.752461 * u**3 + 5.682633 * u**4 - 3.582633 * u**5
    phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
    a = m / math.sqrt(phi)
    a[-1], a[-2] = an, an1
    a[0], a[1] = -an, -an1
    return a


def shapiro_wilk_w(values: np.ndarray) -> float:
    """The Shapiro–Wilk W of ``values`` (n ≥ 6): near 1 for normal data, lower otherwise.

    Constant data returns 1.0 (no evidence against normality, and nothing to divide by).
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    centred = x - x.mean()
    ss = float(centred @ centred)
    if ss <= _SMALL * max(1.0, float(x @ x)):
        return 1.0
    a = _shapiro_coefficients(len(x))
    return min(1.0, float((a @ x) ** 2) / ss)


def shapiro_wilk_z(w: float, n: int) -> float:
    """Royston's (1992) normalising transformation of W for 12 ≤ n ≤ 5000: a standard normal
    deviate under normality, higher = less normal (the test's p-value is 1 − Φ(z)).

    ``ln(1 − W)`` is approximately normal with mean μ(n) and deviation σ(n),
    polynomials in ln n (as in ``scipy.stats.shapiro`` and R's ``swilk.c``).
    """
    mu, sigma = _royston_log_moments(n)
    return (math.log(max(1.0 - w, 1e-300)) - mu) / sigma


def _royston_log_moments(n: int) -> tuple[float, float]:
    """Mean and deviation of ln(1 − W) under normality, 12 ≤ n ≤ 5000 (Royston 1992)."""
    if not 12 <= n <= 5000:
        raise DetectorError(f"the Shapiro–Wilk normalisation needs 12 <= n <= 5000, got {n}")
    log_n = math.log(n)
    mu = 0.0038915 * log_n**3 - 0.083751 * log_n**2 - 0.31082 * log_n - 1.5861
    sigma = math.exp(0.0030302 * log_n**2 - 0.082676 * log_n - 0.4803)
    return mu, sigma


@register
class Prada(Monitor):
    """PRADA with bounded growing sets and a recent window of distances.

    Hyperparameters:

    ``n_classes`` (int ≥ 1, default 10)
        classes of the protected model (a predicted class beyond it is an error).
    ``n_dims`` (int ≥ 1, default 16)
        embedding columns used for distances.
    ``max_per_class`` (int ≥ 1, default 8)
        growing-set members kept per class (oldest out).
    ``window`` (int in [12, 5000], default 128)
        recent distances tested.
    ``min_distances`` (int in [12, window], default 32)
        distances needed before testing.
    ``recent`` (int ≥ 1, default 16)
        last queries kept to recognise re-sends.
    ``duplicate_fraction`` (float ≥ 0, default 0.018)
        distances below this fraction of the median distance between two
        benign queries are duplicates.
    ``smoothing`` (float ≥ 1, default 32)
        the score is an exponential moving average of z over about this many
        queries (1: the latest z).
    ``state_ttl_s`` (float > 0, default 86400)
        seconds a silent client is remembered.

    Learned by calibration: ``duplicate_distance_`` and ``threshold_`` (on z; ``delta(n)`` on W).
    """

    name = "prada"
    params = (
        "n_classes",
        "n_dims",
        "max_per_class",
        "window",
        "min_distances",
        "recent",
        "duplicate_fraction",
        "smoothing",
        "state_ttl_s",
    )
    needs_prediction = True
    needs_embedding = True
    flags_when = "above"

    duplicate_distance_: float

    def __init__(
        self,
        n_classes: int = 10,
        n_dims: int = 16,
        max_per_class: int = 8,
        window: int = 128,
        min_distances: int = 32,
        recent: int = 16,
        duplicate_fraction: float = 0.018,
        smoothing: float = 32.0,
        state_ttl_s: float = 86400.0,
    ) -> None:
        for label, value in (("n_classes", n_classes), ("n_dims", n_dims), ("max_per_class", max_per_class)):
            if int(value) != value or value < 1:
                raise DetectorError(f"prada: {label} must be an integer >= 1, got {value}")
        if int(window) != window or not 12 <= window <= 5000:
            raise DetectorError(f"prada: window must be an integer in [12, 5000], got {window}")
        if int(min_distances) != min_distances or not 6 <= min_distances <= window:
            raise DetectorError(
                f"prada: min_distances must be an integer in [6, window], got {min_distances}"
            )
        if int(recent) != recent or recent < 1:
            raise DetectorError(f"prada: recent must be an integer >= 1, got {recent}")
        if not duplicate_fraction >= 0:
            raise DetectorError(f"prada: duplicate_fraction must be >= 0, got {duplicate_fraction}")
        if not smoothing >= 1:
            raise DetectorError(f"prada: smoothing must be >= 1 (queries), got {smoothing}")
        if not state_ttl_s > 0:
            raise DetectorError(f"prada: state_ttl_s must be > 0, got {state_ttl_s}")
        self.n_classes = int(n_classes)
        self.n_dims = int(n_dims)
        self.max_per_class = int(max_per_class)
        self.window = int(window)
        self.min_distances = int(min_distances)
        self.recent = int(recent)
        self.duplicate_fraction = float(duplicate_fraction)
        self.smoothing = float(smoothing)
        self.state_ttl_s = float(state_ttl_s)

    @property
    def max_state_bytes(self) -> int:  # type: ignore[override]
        sets = self.n_classes * self.max_per_class * self.n_dims * 2
        recent = self.recent * self.n_dims * 2
        return sets + recent + self.n_classes * (4 + 4 + 12) + self.window * 2 + 320

    def _scalars(self) -> dict[str, float | int | str]:
        return {"duplicate_distance_": self.duplicate_distance_}

    def _learn_from_benign(self, batches: list[list[QueryBatch]]) -> None:
        """``duplicate_distance_``: a fraction of the median distance between two benign queries.

        The median over all pairs, not over nearest neighbours: benign users who
        re-send make near-duplicates common among nearest neighbours, never
        among random pairs, so this scale does not depend on how much the
        calibration population re-sends.
        """
        vectors = np.concatenate([b.embedding[:, : self.n_dims] for seq in batches for b in seq])
        sample = vectors[np.random.default_rng(0).permutation(len(vectors))[:1000]].astype(np.float64)
        squared = (sample**2).sum(axis=1)
        distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * sample @ sample.T, 0.0))
        pairs = distances[np.triu_indices(len(sample), 1)]
        self.duplicate_distance_ = self.duplicate_fraction * float(np.median(pairs)) if pairs.size else 0.0

    def _fresh(self) -> dict[str, np.ndarray]:
        c, m, d = self.n_classes, self.max_per_class, self.n_dims
        return {
            "sets": np.zeros((c, m, d), dtype=np.float16),
            "added": np.zeros(c, dtype=np.int32),  # members ever added per class (ring position)
            "grow_threshold": np.zeros(c, dtype=np.float32),
            "grow_stats": np.zeros((c, 3), dtype=np.float32),  # count, sum, sum of squares
            "distances": np.zeros(self.window, dtype=np.float16),
            "recorded": np.zeros((), dtype=np.int64),
            "recent": np.zeros((self.recent, d), dtype=np.float16),
            "seen": np.zeros((), dtype=np.int64),  # queries ever seen (position in "recent")
            "smoothed": np.full((), np.nan, dtype=np.float64),  # moving average of z
        }

    async def observe(self, store: Store, client: str, batch: QueryBatch, now: float) -> MonitorResult:
        if batch.predicted is None:
            raise DetectorError("prada: needs the predicted classes; run it after the response")
        embedding = np.asarray(batch.embedding, dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[1] < self.n_dims:
            raise DetectorError(
                f"prada: needs at least {self.n_dims} embedding columns, got shape {embedding.shape}"
            )
        predicted = np.asarray(batch.predicted).astype(np.int64)
        if predicted.size and (predicted.min() < 0 or predicted.max() >= self.n_classes):
            raise DetectorError(f"prada: predicted class outside [0, {self.n_classes}); set n_classes")
        key = self.key(client)
        (blob,) = await store.get_many([key])
        fresh = self._fresh()
        state = self._decode(blob)
        if (
            state is None
            or any(state.get(k, v).shape != v.shape for k, v in fresh.items())
            or set(state) != set(fresh)
        ):
            state = fresh
        sets, added = state["sets"], state["added"]
        grow_threshold, grow_stats = state["grow_threshold"], state["grow_stats"]
        distances, recorded = state["distances"], int(state["recorded"])
        recent, seen = state["recent"], int(state["seen"])
        duplicate = getattr(self, "duplicate_distance_", 0.0)

        for vector, c in zip(embedding[:, : self.n_dims], predicted, strict=True):
            if seen:
                gaps = recent[: min(seen, self.recent)].astype(np.float32) - vector
                resent = float((gaps * gaps).sum(axis=1).min()) <= duplicate * duplicate
            else:
                resent = False
            recent[seen % self.recent] = vector
            seen += 1
            if resent:
                continue
            members = min(int(added[c]), self.max_per_class)
            if members == 0:
                sets[c, 0] = vector
                added[c] = 1
                continue
            gaps = sets[c, :members].astype(np.float32) - vector
            d_min = float(np.sqrt((gaps * gaps).sum(axis=1).min()))
            if d_min <= duplicate:
                continue
            distances[recorded % self.window] = d_min
            recorded += 1
            if d_min > grow_threshold[c]:
                sets[c, int(added[c]) % self.max_per_class] = vector
                added[c] += 1
                if added[c] >= 2 * self.max_per_class:  # keep the ring position, bounded
                    added[c] -= self.max_per_class
                count, total, squares = grow_stats[c] + np.array(
                    [1.0, d_min, d_min * d_min], dtype=np.float32
                )
                grow_stats[c] = (count, total, squares)
                mean = total / count
                std = math.sqrt(max(0.0, squares / count - mean * mean))
                grow_threshold[c] = max(float(grow_threshold[c]), mean - std)

        state["recorded"] = np.asarray(recorded, dtype=np.int64)
        state["seen"] = np.asarray(seen, dtype=np.int64)
        score = float("nan")
        if recorded >= self.min_distances:
            recent = distances[: min(recorded, self.window)].astype(np.float64)
            z = shapiro_wilk_z(shapiro_wilk_w(recent), len(recent))
            previous = float(state["smoothed"])
            if np.isnan(previous):
                score = z
            else:  # an exponential moving average over ~smoothing queries (n of them in this request)
                weight = 1.0 - (1.0 - 1.0 / self.smoothing) ** max(1, len(predicted))
                score = previous + weight * (z - previous)
            state["smoothed"] = np.asarray(score, dtype=np.float64)
        await store.set_many([(key, self._encode(state))], self.state_ttl_s)
        return self._result(score)

    def delta(self, n: int) -> float:
        """The W below which ``n`` recorded distances are flagged: PRADA's δ for this window size."""
        mu, sigma = _royston_log_moments(n)
        return 1.0 - math.exp(mu + self.threshold_ * sigma)
