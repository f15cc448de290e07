"""Feature squeezing (Xu, Evans, Qi, "Feature Squeezing: Detecting Adversarial
Examples in Deep Neural Networks", NDSS 2018).

Idea: an adversarial example is a small, carefully placed perturbation; a
"squeezer" that removes fine detail (fewer bits per value, a median filter)
changes the model's prediction on it much more than on a benign input. The
score of a sample is

    score = max over squeezers s of || f(x) − f(s(x)) ||₁

where ``f`` is the protected model's softmax output, so it lies in [0, 2];
higher = more anomalous. For MNIST the paper uses 1-bit depth and a 2×2
median filter (the defaults here) and reports 98 % detection of its attack
mix at about 5 % FPR.

What it assumes: inputs are images laid out ``(n, height, width)`` or
``(n, height, width, channels)`` with values in ``value_range``; the model
outputs class probabilities (or logits, with ``softmax=True``); benign
predictions are stable under squeezing.

The model is in the loop: the squeezed variants must go to the model. So that
this costs one upstream round trip, the gateway sends ``[x, *variants(x)]``
concatenated along the batch axis in ONE call and scores the split response
with :meth:`FeatureSqueezing.score_outputs`; ``_score`` does exactly the same
with its predictor (one call per batch), so offline and gateway scores agree.

Measured offline (threshold at 2 % FPR on the 500 validation digits; the
demo CNN, 96 % test accuracy; FGSM/PGD at ε = 0.1 and an untargeted CW-L2,
κ = 0, counting successful adversarial examples only): both squeezers catch
64 % FGSM, 79 % PGD, 82 % CW-L2; bit depth alone 75 %, 86 %, 84 %. The
squeezers' benign tail sets the threshold: a model trained on 3,500 digits
misreads a few percent of benign digits once squeezed (above all 2×2-median
ones), so the L1 distance of those digits is large too. FGSM and PGD are
caught at 100 % by the Mahalanobis detector; feature squeezing is the one for
CW-L2, whose perturbations stay on the digit's strokes.

Squeezers (``squeezers``, applied independently, each one variant):

``bit_depth``
    reduce to ``bit_depth`` bits: ``v = rint((x − lo) / (hi − lo) · (2^b − 1)) / (2^b − 1) · (hi − lo) + lo``
    with ``(lo, hi) = value_range`` (the paper's ``np.rint`` code; for
    b = 1 on [0, 1] that is "x > 0.5", with exactly 0.5 rounding to 0 (round
    half to even)). Values outside ``value_range`` are not clipped.
``median``
    ``median_size × median_size`` median filter over height and width, each
    channel and sample separately: :func:`median_filter`, which equals the
    paper's ``scipy.ndimage.median_filter(x, size=(1, k, k, 1), mode="reflect")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.base import Detector, DetectorError, Predictor, register

__all__ = [
    "SQUEEZERS",
    "FeatureSqueezing",
    "ReadsModelOutput",
    "check_probabilities",
    "median_filter",
    "probabilities_of",
    "reduce_bit_depth",
    "softmax_rows",
]


def reduce_bit_depth(x: np.ndarray, bits: int, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Quantise ``x`` to ``2**bits`` levels spread over ``value_range``; same shape and dtype.

    Float inputs are computed in their own dtype; integer inputs in float64
    and rounded back.
    """
    lo, hi = value_range
    levels = 2**bits - 1
    work = x if x.dtype.kind == "f" else x.astype(np.float64)
    ftype = work.dtype.type
    if lo == 0.0 and hi == 1.0:  # the common case, without needless arithmetic
        squeezed = np.rint(work * ftype(levels)) / ftype(levels)
    else:
        width = ftype(hi - lo)
        squeezed = np.rint((work - ftype(lo)) / width * ftype(levels)) / ftype(levels) * width + ftype(lo)
    if x.dtype.kind != "f":
        squeezed = np.rint(squeezed)
    return squeezed.astype(x.dtype, copy=False)


def median_filter(x: np.ndarray, size: int) -> np.ndarray:
    """``size × size`` median filter over axes 1 and 2 of ``x`` ((n, H, W) or (n, H, W, C)).

    Defined exactly as ``scipy.ndimage.median_filter(x, size=(1, size, size[, 1]),
    mode="reflect")``, so that an even window is well defined:

    - window: output pixel (i, j) takes input rows ``i − size//2 … i − size//2 + size − 1``
      (and the same for columns): for size 2, rows i−1 and i, columns j−1 and j;
    - padding: scipy's ``reflect`` (= numpy's ``symmetric``: ``d c b a | a b c d | d c b a``);
      for size 2 that repeats the first row and the first column;
    - median of the ``m = size²`` values: the element at index ``m // 2`` of
      them sorted, i.e. for an even window the UPPER of the two middle values
      (for 2×2: the second largest of four), not their average.

    Pure numpy; same shape and dtype as ``x``.
    """
    if x.ndim not in (3, 4):
        raise DetectorError(
            "feature_squeezing: median filter needs images (n, height, width[, channels]), "
            f"got shape {list(x.shape)}"
        )
    if size == 1:
        return x.copy()
    before = size // 2
    after = size - 1 - before
    pad = [(0, 0), (before, after), (before, after)] + [(0, 0)] * (x.ndim - 3)
    padded = np.pad(x, pad, mode="symmetric")
    height, width = x.shape[1], x.shape[2]
    windows = [padded[:, i : i + height, j : j + width] for i in range(size) for j in range(size)]
    if size == 2:
        # Second largest of four without sorting: the larger of (the smaller
        # pair maximum, the larger pair minimum).
        a, b, c, d = windows
        return np.maximum(
            np.minimum(np.maximum(a, b), np.maximum(c, d)), np.maximum(np.minimum(a, b), np.minimum(c, d))
        )
    stacked = np.stack(windows)
    middle = len(windows) // 2
    return np.partition(stacked, middle, axis=0)[middle]


# The squeezer names ``squeezers`` may list.
SQUEEZERS = ("bit_depth", "median")


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, classes) logits, shifted by each row's maximum."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def probabilities_of(output: np.ndarray, softmax: bool = False) -> np.ndarray:
    """A model output as (n, classes) float64 rows; softmax of them when they hold logits."""
    out = np.asarray(output, dtype=np.float64)
    out = out.reshape(len(out), -1)
    return softmax_rows(out) if softmax else out


def check_probabilities(probs: np.ndarray, detector: str, output: str) -> int:
    """Raise unless ``probs`` rows look like probability vectors; returns their width (classes).

    Detectors that read the model's output check a few samples at fit time, so a
    logits output fails there and not as silently meaningless scores.
    """
    sums = probs.sum(axis=1)
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6 or np.abs(sums - 1).max() > 1e-3:
        raise DetectorError(
            f"{detector}: output '{output}' does not look like probabilities (rows sum to "
            f"{sums.min():.4g}..{sums.max():.4g}); set softmax=True if it holds logits"
        )
    return int(probs.shape[1])


class ReadsModelOutput(Detector):
    """A detector that reads the protected model's class probabilities (``output``, ``softmax``).

    It learns the output's width, ``n_classes_``, from a few reference samples
    (:meth:`_learn_classes`), checking that they are probabilities, and saves it.
    """

    output: str
    softmax: bool
    n_classes_: int

    def _learn_classes(self, outputs: np.ndarray) -> None:
        self.n_classes_ = check_probabilities(probabilities_of(outputs, self.softmax), self.name, self.output)

    def _scalars(self) -> dict[str, float | int | str]:
        return {"n_classes_": self.n_classes_}


@register
class FeatureSqueezing(ReadsModelOutput):
    """Feature squeezing: max L1 distance between the model's softmax on x and on squeezed x.

    Hyperparameters:

    ``squeezers`` (sequence of str, default ``("bit_depth", "median")``)
        which squeezers to apply, each one variant (names in :data:`SQUEEZERS`).
    ``bit_depth`` (int 1..16, default 1)
        bits kept by ``bit_depth``.
    ``median_size`` (int ≥ 1, default 2)
        window side of ``median``.
    ``value_range`` ((float, float), default (0.0, 1.0))
        the input's value range, spread over the bit-depth levels.
    ``output`` (str, default ``"probabilities"``)
        the protected model's output the gateway hands to the detector.
    ``softmax`` (bool, default False)
        apply a softmax to that output first (when it holds logits).

    Learned (by ``fit``): ``n_classes_`` (int), the width of the model output.

    Needs a predictor: ``predictor("", batch)`` returns the model's ``output``
    for ``batch``, one row per sample.
    """

    name = "feature_squeezing"
    params = ("squeezers", "bit_depth", "median_size", "value_range", "output", "softmax")
    needs_predictor = True

    n_classes_: int

    def __init__(
        self,
        squeezers: Sequence[str] = ("bit_depth", "median"),
        bit_depth: int = 1,
        median_size: int = 2,
        value_range: Sequence[float] = (0.0, 1.0),
        output: str = "probabilities",
        softmax: bool = False,
    ) -> None:
        squeezers = tuple(squeezers)
        unknown = [s for s in squeezers if s not in SQUEEZERS]
        if unknown or not squeezers:
            raise DetectorError(
                f"feature_squeezing: squeezers must be a non-empty list of {', '.join(SQUEEZERS)}; "
                f"got {list(squeezers)}"
            )
        if int(bit_depth) != bit_depth or not 1 <= bit_depth <= 16:
            raise DetectorError(f"feature_squeezing: bit_depth must be an integer in 1..16, got {bit_depth}")
        if int(median_size) != median_size or median_size < 1:
            raise DetectorError(f"feature_squeezing: median_size must be an integer >= 1, got {median_size}")
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise DetectorError(
                f"feature_squeezing: value_range must be (low, high) with high > low, got {value_range}"
            )
        # Tuples, so that a saved and reloaded detector has equal params.
        self.squeezers = squeezers
        self.bit_depth = int(bit_depth)
        self.median_size = int(median_size)
        self.value_range = (low, high)
        self.output = output
        self.softmax = bool(softmax)

    # -- the two halves the gateway uses -------------------------------------------

    def variants(self, x: np.ndarray) -> list[np.ndarray]:
        """The squeezed batches, one per squeezer, each the shape and dtype of ``x``.

        The gateway sends ``np.concatenate([x, *variants(x)])`` upstream in one
        call and splits the output into ``1 + len(squeezers)`` equal parts.
        """
        return [self._squeeze(squeezer, x) for squeezer in self.squeezers]

    def _squeeze(self, squeezer: str, x: np.ndarray) -> np.ndarray:
        if squeezer == "bit_depth":
            return reduce_bit_depth(x, self.bit_depth, self.value_range)
        return median_filter(x, self.median_size)

    def score_outputs(self, original: np.ndarray, variants: Sequence[np.ndarray]) -> np.ndarray:
        """Scores (n,) from the model's output on ``x`` and on each variant (each (n, classes))."""
        base = self._probabilities(original)
        scores = np.zeros(len(base))
        for output in variants:
            probs = self._probabilities(output)
            if probs.shape != base.shape:
                raise DetectorError(
                    f"feature_squeezing: a variant's output has shape {list(probs.shape)}, "
                    f"the original's {list(base.shape)}"
                )
            np.maximum(scores, np.abs(base - probs).sum(axis=1), out=scores)
        scores[np.isnan(scores)] = np.inf
        return scores

    def _probabilities(self, output: np.ndarray) -> np.ndarray:
        return probabilities_of(output, self.softmax)

    # -- estimator -------------------------------------------------------------------

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        # Nothing to learn but the output width; check the predictor answers
        # with probabilities on a few samples, so a logits output fails here
        # and not as silently meaningless scores.
        sample = x_ref[:8]
        outputs = self._predict(sample, predictor)
        self._learn_classes(outputs[0])

    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0)
        original, *variants = self._predict(x, predictor)
        return self.score_outputs(original, variants)

    def _predict(self, x: np.ndarray, predictor: Predictor | None) -> list[np.ndarray]:
        """Model outputs on ``x`` and each variant, from ONE predictor call."""
        if predictor is None:  # the base class checks this already; keeps the type narrow
            raise DetectorError("feature_squeezing: calls the protected model; pass a predictor")
        parts = 1 + len(self.squeezers)
        batch = np.concatenate([x, *self.variants(x)])
        out = np.asarray(predictor("", batch))
        if out.ndim < 1 or len(out) != len(batch):
            raise DetectorError(
                f"feature_squeezing: predictor returned {out.shape[0] if out.ndim else 'a scalar'} rows for "
                f"a batch of {len(batch)}; it must return one output row per input"
            )
        return np.split(out, parts)
