"""MagNet's probability-divergence detector (Meng & Chen, "MagNet: a Two-Pronged Defense
against Adversarial Examples", CCS 2017, detector II).

Idea: an autoencoder trained on benign data moves an input towards the benign
manifold. On a benign input the model answers the same for x and for AE(x);
an adversarial perturbation that the autoencoder partly removes changes the
answer. MagNet measures the change as the Jensen-Shannon divergence of the
model's temperature-softened distributions:

    score = JSD( softmax(l(x) / T), softmax(l(AE(x)) / T) )

with ``l`` the model's logits and T the temperature (MagNet uses T = 10 and
T = 40; the default here is T = 10: on the demo's benign calibration digits
the two rank the digits alike, Spearman 0.95, so one of them carries the
information). Natural logarithms, so the score is in [0, ln 2]; higher = more
anomalous. NaN/Inf become +inf.

The logits are not needed: ``softmax(log p / T) = softmax(l / T)`` for
``p = softmax(l)``, so the detector reads the probability output the gateway
already decodes (zero probabilities are floored at the smallest float32
subnormal; on the demo model this changes no score by more than 1e-7).

What it assumes: the autoencoder (``detectors.autoencoder``; trained by
``tfshield calibrate``) is served beside the protected model, and the model
outputs probabilities (or logits, with ``softmax=True``) and is confident on
benign inputs and on their reconstructions. It is a statistic for
perturbations the autoencoder undoes; an attacker who knows the autoencoder
can optimise through it (Carlini & Wagner, "MagNet and 'Efficient Defenses
...' are not robust", 2017).

Gateway path: the reconstruction comes from the autoencoder model first (one
call), then the model's outputs on AE(x) ride in the client's own upstream
call, concatenated after its rows (and after feature squeezing's variants);
the client gets only its rows. ``_score`` does the same with a predictor: one
call to the autoencoder, one to the model on ``[x, AE(x)]``.

Measured on the demo model (thresholds from the 1,000 calibration digits,
FPR on the 500 held-out ones, the successful attacks of the evaluation's
earlier, short CW-L2 schedule): alone at
0.4 % target FPR it catches 26 % of CW-L2 and 79 % of DeepFool (0.2 %
held-out FPR); its value is in the Fisher fusion (``detectors.fusion``),
where it raises CW-L2 from 59 % to 78 % at 1.6 % held-out FPR.
"""

from __future__ import annotations

import numpy as np

from detectors.base import DetectorError, Predictor, register
from detectors.squeeze import ReadsModelOutput, softmax_rows

__all__ = ["MagnetDivergence", "jensen_shannon", "softened"]

# Zero probabilities (float32 underflow of a very confident answer) are floored here before the log.
PROBABILITY_FLOOR = float(np.finfo(np.float32).smallest_subnormal)


def softened(output: np.ndarray, temperature: float, logits: bool = False) -> np.ndarray:
    """softmax(logits / T) as (n, classes) float64, from probabilities (default) or logits."""
    values = np.asarray(output, dtype=np.float64).reshape(len(output), -1)
    if not logits:
        values = np.log(np.maximum(values, PROBABILITY_FLOOR))
    return softmax_rows(values / temperature)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (natural log) of probability rows ``p`` and ``q``."""
    mean = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * (np.log(a) - np.log(mean)), 0.0)
        return terms.sum(axis=1)

    return 0.5 * kl(p) + 0.5 * kl(q)


@register
class MagnetDivergence(ReadsModelOutput):
    """MagNet detector II: JSD between the model's softened answers on x and on AE(x).

    Hyperparameters:

    ``autoencoder_model`` (str, default ``"mnist_autoencoder"``)
        the served autoencoder's model name.
    ``autoencoder_output`` (str, default ``"reconstruction"``)
        its output holding AE(x), the shape of x.
    ``temperature`` (float > 0, default 10.0)
        T; MagNet's values are 10 and 40.
    ``output`` (str, default ``"probabilities"``)
        the protected model's output read.
    ``softmax`` (bool, default False)
        that output holds logits, not probabilities.

    Learned (by ``fit``): ``n_classes_`` (int), the width of the output.

    Needs a predictor: ``predictor(autoencoder_model, batch)`` returns AE(batch)
    and ``predictor("", batch)`` the model's ``output``.
    """

    name = "magnet_jsd"
    params = ("autoencoder_model", "autoencoder_output", "temperature", "output", "softmax")
    needs_predictor = True

    n_classes_: int

    def __init__(
        self,
        autoencoder_model: str = "mnist_autoencoder",
        autoencoder_output: str = "reconstruction",
        temperature: float = 10.0,
        output: str = "probabilities",
        softmax: bool = False,
    ) -> None:
        for label, value in (
            ("autoencoder_model", autoencoder_model),
            ("autoencoder_output", autoencoder_output),
            ("output", output),
        ):
            if not isinstance(value, str) or not value:
                raise DetectorError(f"magnet_jsd: {label} must be a non-empty name, got {value!r}")
        if not float(temperature) > 0.0:
            raise DetectorError(f"magnet_jsd: temperature must be > 0, got {temperature}")
        self.autoencoder_model = autoencoder_model
        self.autoencoder_output = autoencoder_output
        self.temperature = float(temperature)
        self.output = output
        self.softmax = bool(softmax)

    def score_outputs(self, original: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
        """Scores (n,) from the model's output on x and on AE(x), each (n, classes)."""
        p = softened(original, self.temperature, self.softmax)
        q = softened(reconstructed, self.temperature, self.softmax)
        if p.shape != q.shape:
            raise DetectorError(
                f"magnet_jsd: the output on the reconstructions has shape {list(q.shape)}, "
                f"on the inputs {list(p.shape)}"
            )
        scores = jensen_shannon(p, q)
        scores[~np.isfinite(scores)] = np.inf
        return scores

    def check_reconstruction(self, x: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """AE(x) as an array shaped and typed like ``x`` (raises if it cannot be)."""
        reconstruction = np.asarray(reconstruction)
        if reconstruction.size != x.size:
            raise DetectorError(
                f"magnet_jsd: the autoencoder returned {reconstruction.size} values for an input of {x.size}"
            )
        return reconstruction.reshape(x.shape).astype(x.dtype, copy=False)

    def _outputs(self, x: np.ndarray, predictor: Predictor | None) -> tuple[np.ndarray, np.ndarray]:
        if predictor is None:
            raise DetectorError("magnet_jsd: calls the autoencoder and the protected model; pass a predictor")
        reconstruction = self.check_reconstruction(x, predictor(self.autoencoder_model, x))
        batch = np.concatenate([x, reconstruction])
        out = np.asarray(predictor("", batch))
        if out.ndim < 1 or len(out) != len(batch):
            raise DetectorError(f"magnet_jsd: predictor returned {len(out)} rows for a batch of {len(batch)}")
        original, reconstructed = np.split(out, 2)
        return original, reconstructed

    def _fit(self, x_ref: np.ndarray, predictor: Predictor | None) -> None:
        original, _ = self._outputs(x_ref[:8], predictor)
        self._learn_classes(original)

    def _score(self, x: np.ndarray, predictor: Predictor | None) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0)
        return self.score_outputs(*self._outputs(x, predictor))
