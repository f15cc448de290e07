"""Distribution shift: Mahalanobis distance under a low-rank-plus-diagonal Gaussian.

Papers: the Mahalanobis distance to a Gaussian fitted on benign data as an
out-of-distribution score (Lee, Lee, Lee, Shin, "A simple unified framework
for detecting out-of-distribution samples and adversarial attacks", NeurIPS
2018, here on the input rather than on hidden features), with the covariance
modelled as principal components plus a per-feature residual variance, as in
factor analysis / probabilistic PCA (Tipping & Bishop, JRSS-B 1999).

What it assumes: benign inputs, flattened to vectors, are roughly Gaussian
around the reference mean with most of their variance in a few principal
directions, and everything else is small per-feature noise. Numpy only.

Fit (on benign reference data, n samples × d features, float64): the mean μ;
the top ``k = min(n_components, n - 1, d)`` right singular vectors ``V`` of the
centred data and their variances ``λ_i = s_i² / (n - 1)``; the per-feature
variance of the residual after projecting onto them, ``ψ_j``; and a floor
``ε = variance_floor × (mean variance per feature)``. The score of a sample x is

    z = Vᵀ(x − μ),   r = (x − μ) − V z,
    score = sqrt( Σ_i z_i² / (λ_i + ε)  +  Σ_j r_j² / (ψ_j + ε) )

the Mahalanobis distance (in standard deviations) of x in the top-k space
plus its residual energy normalised feature by feature.

Why this form (measured on the bundled MNIST split, threshold at 2 % FPR on
the validation split, k = 50): the projection term alone flags almost no
noise (Gaussian σ = 0.1: 1 %, ±0.1 sign noise: 1 %), since noise is nearly
orthogonal to the digit manifold. A residual normalised by one global variance
(probabilistic PCA's isotropic model) flags only 5 % of both, because benign
residual energy varies a lot between digits. Normalising the residual per
feature flags 100 % of both (and of ±0.05 sign noise): on MNIST 16 % of the
pixels (the border) never light up in the reference data, so their ψ_j is
0 and any energy there is far off-manifold; L∞ attacks (FGSM, PGD) perturb
every pixel. The floor ε keeps those features finite: any ``variance_floor``
from 10⁻⁵ to 10⁻³ (k = 20, 50 or 100) kept all of the above at 100 % with
test FPR 1.7–2.1 %; 10⁻² lets ±0.05 sign noise through (5 %), and larger
floors (10⁻¹ of the mean residual variance) let ±0.1 through too (~65 %).
The in-subspace term keeps the detector sensitive to on-manifold shift. The
floor's unit is the mean variance per feature, not the mean residual
variance, which is rounding noise when k components explain everything.

Why k = 30 by default: the cost of scoring is proportional to k, and the
gateway's budget for this detector and validation together is 0.3 ms at
concurrency 1. In ``tfshield bench`` (mnist, batch 32, settled alternating
rounds) validation + Mahalanobis added +0.333, +0.344 and +0.384 ms over the
plain gateway with k = 50 and +0.194, +0.232 and +0.204 ms with k = 30 (about
100 µs less gateway CPU per call). What k = 30 gives up, measured on the demo split
(fit 3,500 / calibration 1,000 / held-out 500 digits): alone at 2 % FPR it
still flags 100 % of Gaussian σ = 0.1, ±0.1 and ±0.05 sign noise and uniform
noise, like k = 20, 50 and 100 (held-out FPR 1.8 % for each); inside the
eval's Fisher fusion, refitted on the same artefacts and adversarial
examples, CW-L2 detection went from 190 to 189 of 198 (k = 40: 191, k ≤ 25:
188), FGSM/PGD and DeepFool stayed at 100 % and the held-out FPR at 7 of 500.

Cost of fitting: one thin SVD of the (n × d) reference data, O(n d min(n, d))
time and O(n d) memory (about 1 s for 3,500 MNIST digits; for inputs with
hundreds of thousands of features, fit on a subsample or downscaled input).
Cost of scoring: two (d × k) matrix products per batch, O(n d k); about 10–20 µs per
sample at batch 1 and a few µs per sample at batch 64 for MNIST with k = 50
(numbers in ``tests/detectors/test_mahalanobis.py``). With k = 30, ``tfshield bench``'s micro
table measured 15.2–15.7 µs per sample at batch 1 and 3.4 at batch 64 (four runs), against 18.8 and 4.6
with k = 50. The detector scores into
per-thread buffers it reuses, with a C-contiguous copy of ``Vᵀ``: an (n × d)
float64 temporary over glibc's 128 KiB mmap threshold (n ≥ 21 on MNIST) is
mapped, page-faulted and unmapped on every call, which tripled the cost of a
batch of 32 (~550 µs instead of ~160 µs), and OpenBLAS multiplies by a
transposed (F-ordered) matrix 3–6× slower than by a contiguous one below ~30
rows. Both are derived from the learned arrays on first use, never saved.

Scores stay in float64, whatever the input's dtype: float32 matrix products
would halve the cost again (~85 µs for 32 MNIST samples) within 1e-7 of the
float64 scores, but OpenBLAS picks a different sgemm kernel below ~30 rows, so
a sample's score would then depend on the micro-batch it was scored in, which
the detector contract rules out (``test_a_sample_scores_the_same_whatever_its_batch``).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from detectors.base import Detector, DetectorError, Predictor, register

__all__ = ["LEARNED_ARRAYS", "MahalanobisDetector", "mahalanobis_scores"]

# What fit learns and save writes (the arguments of mahalanobis_scores after x, in order).
LEARNED_ARRAYS = ("mean_", "components_", "component_weights_", "residual_weights_")


@register
class MahalanobisDetector(Detector):
    """Mahalanobis distance in a top-k PCA space plus a per-feature-normalised residual.

    Hyperparameters:

    ``n_components`` (int ≥ 1, default 30)
        principal components kept (capped at ``n - 1`` and ``d``); the
        scoring cost is proportional to it (module docstring: why 30).
    ``variance_floor`` (float > 0, default 1e-4)
        added to every variance before dividing, as a fraction of the
        reference data's mean variance per feature (a shrinkage that keeps
        features the reference data never varies finite).

    Learned (by ``fit``): ``mean_`` (d,), ``components_`` (d, k) orthonormal
    columns, ``component_weights_`` (k,) = 1 / (λ + ε), ``residual_weights_``
    (d,) = 1 / (ψ + ε); all float64.

    Scores: Mahalanobis distance, ≥ 0, in standard deviations; ``+inf`` for a
    sample with NaN or Inf.
    """

    name = "mahalanobis"
    params = ("n_components", "variance_floor")

    mean_: np.ndarray
    components_: np.ndarray
    component_weights_: np.ndarray
    residual_weights_: np.ndarray

    def __init__(self, n_components: int = 30, variance_floor: float = 1e-4) -> None:
        if int(n_components) != n_components or n_components < 1:
            raise DetectorError(f"mahalanobis: n_components must be an integer >= 1, got {n_components}")
        if not variance_floor > 0.0:
            raise DetectorError(f"mahalanobis: variance_floor must be > 0, got {variance_floor}")
        self.n_components = int(n_components)
        self.variance_floor = float(variance_floor)

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        n = len(x_ref)
        x = x_ref.reshape(n, -1).astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise DetectorError("mahalanobis: reference data holds NaN or Inf; clean it first")
        d = x.shape[1]
        k = min(self.n_components, n - 1, d)
        mean = x.mean(axis=0)
        centred = x - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        components = np.ascontiguousarray(vt[:k].T)
        variances = singular[:k] ** 2 / (n - 1)
        residual = centred - (centred @ components) @ components.T
        residual_variances = (residual**2).sum(axis=0) / (n - 1)
        # The floor's unit is the mean variance per feature (1 for constant
        # data). Not the mean residual variance: when k components explain
        # everything that is rounding noise, and dividing by it would blow
        # the residual's rounding noise up into the score.
        scale = float((centred**2).sum() / ((n - 1) * d)) or 1.0
        floor = self.variance_floor * scale
        self.mean_ = mean
        self.components_ = components
        self.component_weights_ = 1.0 / (variances + floor)
        self.residual_weights_ = 1.0 / (residual_variances + floor)

    def _state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in LEARNED_ARRAYS}

    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        n = len(x)
        d = self.mean_.shape[0]
        features = math.prod(x.shape[1:])
        if features != d:
            raise DetectorError(
                f"mahalanobis: samples have {features} features (shape {list(x.shape[1:])}); "
                f"the detector was fitted on {d}"
            )
        return self._scorer()(x.reshape(n, d))

    def _scorer(self) -> _Scorer:
        # Built from the learned arrays on first use, and again when fit or load replaced them.
        scorer: _Scorer | None = self.__dict__.get("_scorer_cache")
        if scorer is None or not scorer.built_from(self):
            scorer = _Scorer(self.mean_, self.components_, self.component_weights_, self.residual_weights_)
            self._scorer_cache = scorer
        return scorer


def mahalanobis_scores(
    x: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    component_weights: np.ndarray,
    residual_weights: np.ndarray,
) -> np.ndarray:
    """The score of :class:`MahalanobisDetector` for flat samples ``x`` (n, d), from its learned arrays.

    Computed in the dtype numpy promotes ``x`` and the arrays to; NaN (a sample
    holding NaN or Inf) becomes ``+inf``.
    """
    return _scores_into(x, mean, components, components.T, component_weights, residual_weights)


Scratch = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[None, None, None]


def _scores_into(
    x: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    components_t: np.ndarray,
    component_weights: np.ndarray,
    residual_weights: np.ndarray,
    scratch: Scratch = (None, None, None),
) -> np.ndarray:
    """The score, with its (n, d), (n, d) and (n, k) temporaries written into ``scratch`` when given."""
    centred, projected, z = scratch
    centred = np.subtract(x, mean, out=centred)
    z = np.matmul(centred, components, out=z)
    projected = np.matmul(z, components_t, out=projected)
    residual = np.subtract(centred, projected, out=centred)
    np.square(residual, out=residual)
    np.square(z, out=z)
    scores = residual @ residual_weights
    scores += z @ component_weights
    np.sqrt(scores, out=scores)
    scores[np.isnan(scores)] = np.inf
    return scores


class _Scorer:
    """:func:`mahalanobis_scores` for one detector's learned arrays, without allocating per call.

    Keeps a C-contiguous ``Vᵀ`` and, per thread (the gateway scores on its event
    loop and in a worker thread), scratch arrays for up to :attr:`BUFFER_ROWS`
    samples, grown as batches grow. Larger batches (calibration, offline
    evaluation) allocate: their arithmetic dwarfs the page faults.
    """

    # Scratch is reused from this many bytes per (n × d) temporary (smaller ones are
    # cheap to allocate) up to BUFFER_ROWS samples (larger batches, in calibration or
    # offline evaluation, allocate: their arithmetic dwarfs the page faults).
    BUFFER_MIN_BYTES = 64 * 1024
    BUFFER_ROWS = 256

    def __init__(
        self,
        mean: np.ndarray,
        components: np.ndarray,
        component_weights: np.ndarray,
        residual_weights: np.ndarray,
    ) -> None:
        self.mean = mean
        self.components = components
        self.components_t = np.ascontiguousarray(components.T)
        self.component_weights = component_weights
        self.residual_weights = residual_weights
        self.dtype = np.result_type(mean, components)
        self._row_bytes = components.shape[0] * self.dtype.itemsize
        self._local = threading.local()

    def built_from(self, detector: MahalanobisDetector) -> bool:
        return (
            self.mean is detector.mean_
            and self.components is detector.components_
            and self.component_weights is detector.component_weights_
            and self.residual_weights is detector.residual_weights_
        )

    def _scratch(self, n: int) -> Scratch:
        if n * self._row_bytes < self.BUFFER_MIN_BYTES or n > self.BUFFER_ROWS:
            return None, None, None
        buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = getattr(self._local, "buffers", None)
        if buffers is None or len(buffers[0]) < n:
            rows = min(self.BUFFER_ROWS, 2 * n)  # room to grow before the next allocation
            d, k = self.components.shape
            buffers = (
                np.empty((rows, d), self.dtype),
                np.empty((rows, d), self.dtype),
                np.empty((rows, k), self.dtype),
            )
            self._local.buffers = buffers
        return buffers[0][:n], buffers[1][:n], buffers[2][:n]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _scores_into(
            x,
            self.mean,
            self.components,
            self.components_t,
            self.component_weights,
            self.residual_weights,
            self._scratch(len(x)),
        )
