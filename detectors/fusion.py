"""Fisher fusion of detector scores: one verdict, one threshold, calibrated on benign data.

Flagging a sample when ANY of k detectors flags it, each at fpr / k (a
Bonferroni split), spends the false-positive budget on every detector's own
benign tail. A sample that is moderately unusual on several detectors at once
(Carlini-Wagner L2 examples on the demo model: near the decision boundary AND
changed by squeezing AND by the autoencoder) passes all k thresholds. Fusion
turns each detector's score into its tail p-value against benign data and
combines the p-values with Fisher's method (R. A. Fisher, "Statistical
Methods for Research Workers", 1925, § 21.1):

    p_d(x) = (1 + #{benign calibration scores of d ≥ score_d(x)}) / (n + 1)
    score(x) = −2 Σ_d ln p_d(x)

(the conformal p-value: Vovk, Gammerman & Shafer, "Algorithmic Learning in a
Random World", 2005), higher = more anomalous. Fisher's χ² reference
distribution would need independent detectors, which these are not, so the
threshold is not taken from χ²: it is the target-FPR quantile of the fused
score of the calibration samples themselves, each with leave-one-out
p-values (its own score left out of its reference), which are exchangeable
with a new benign sample's. The false-positive rate is therefore the target
whatever the detectors' correlation.

What it assumes: the member detectors scored the SAME benign calibration
samples (rows aligned); every member scores every request (a member that
failed leaves the fusion unscored, which the gateway's failure mode handles).

Measured on the demo model (1,000 calibration digits, 500 held-out, the
evaluation's successful attacks): over Mahalanobis, feature squeezing, the
autoencoder, margin and MagNet's JSD at 2 % target, CW-L2 77.6 % (the OR of
the same five at 0.4 % each: 64.5 %), DeepFool 95 %, FGSM/PGD at ε ≥ 0.1
100 %, held-out FPR 1.6 %. Min-p instead of Fisher (−min ln p) behaves like
the OR (64.5 %).

Saved like a detector: ``fusion.json`` (name, format version, members,
threshold) and ``arrays.npz`` (``reference_``, members × n, float64), never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import numpy as np

from detectors.base import FORMAT_VERSION, ArtefactError, DetectorError, NotCalibrated, threshold_at_fpr

__all__ = ["FisherFusion"]


class FisherFusion:
    """Fisher's combination of the members' benign tail p-values; one threshold at the target FPR.

    Hyperparameters: ``members`` (sequence of detector names, at least 2).

    Learned: ``reference_`` (members × n float64), the members' scores on the
    benign calibration samples, rows aligned (set by ``fit``); ``threshold_``
    and ``target_fpr_`` (set by ``calibrate``).
    """

    name = "fisher"
    params = ("members",)

    reference_: np.ndarray
    threshold_: float
    target_fpr_: float

    def __init__(self, members: Sequence[str]) -> None:
        members = tuple(str(m) for m in members)
        if len(members) < 2 or len(set(members)) != len(members):
            raise DetectorError(
                f"fisher: members must name at least 2 distinct detectors, got {list(members)}"
            )
        self.members = members

    @property
    def fitted(self) -> bool:
        return hasattr(self, "reference_")

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "threshold_")

    def fit(self, benign_scores: Mapping[str, np.ndarray]) -> Self:
        """Learn each member's benign score distribution (the same samples, in the same order)."""
        missing = [m for m in self.members if m not in benign_scores]
        if missing:
            raise DetectorError(f"fisher: no benign scores for member(s) {missing}")
        rows = [np.asarray(benign_scores[m], dtype=np.float64).ravel() for m in self.members]
        sizes = {len(r) for r in rows}
        if len(sizes) != 1 or min(sizes) < 2:
            raise DetectorError(
                f"fisher: members must score the same benign samples (at least 2); got sizes {sorted(sizes)}"
            )
        reference = np.stack(rows)
        if np.isnan(reference).any():
            raise DetectorError("fisher: benign calibration scores contain NaN; check the reference data")
        self.reference_ = reference
        self._sorted = np.sort(reference, axis=1)
        return self

    def calibrate(self, fpr: float) -> Self:
        """Set ``threshold_``: at most ``fpr`` of the calibration samples' fused scores (leave-one-out
        p-values) exceed it."""
        if not self.fitted:
            raise NotCalibrated("fusion 'fisher' is not fitted; call fit(benign_scores) first")
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"fisher: fpr must be in (0, 1), got {fpr}")
        self.threshold_ = threshold_at_fpr(self._fused(self.reference_, leave_one_out=True), fpr)
        self.target_fpr_ = float(fpr)
        return self

    def score(self, member_scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fused scores (n,) from each member's scores (n,) on the same samples."""
        if not self.fitted:
            raise NotCalibrated("fusion 'fisher' is not fitted; call fit(benign_scores) first")
        missing = [m for m in self.members if m not in member_scores]
        if missing:
            raise DetectorError(f"fisher: no scores from member(s) {missing}")
        rows = np.stack([np.asarray(member_scores[m], dtype=np.float64).ravel() for m in self.members])
        return self._fused(rows, leave_one_out=False)

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        if not self.calibrated:
            raise NotCalibrated("fusion 'fisher' has no threshold; call calibrate(fpr) first")
        return scores > self.threshold_

    def _fused(self, rows: np.ndarray, leave_one_out: bool) -> np.ndarray:
        n = self._sorted.shape[1]
        total = np.zeros(rows.shape[1])
        for sorted_row, scores in zip(self._sorted, rows, strict=True):
            # A NaN score is treated as the most anomalous possible (smallest p-value).
            scores = np.where(np.isnan(scores), np.inf, scores)
            at_least = n - np.searchsorted(sorted_row, scores, side="left")
            if leave_one_out:  # the sample is in the reference: (1 + #others ≥ s) / ((n − 1) + 1)
                p = at_least / n
            else:
                p = (1.0 + at_least) / (n + 1.0)
            total -= 2.0 * np.log(p)
        return total

    # -- artefacts ---------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        if not self.calibrated:
            raise NotCalibrated("fusion 'fisher' has no threshold; calibrate it before saving")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "arrays.npz", reference_=self.reference_)
        meta = {
            "fusion": self.name,
            "format_version": FORMAT_VERSION,
            "params": {"members": list(self.members)},
            "threshold_": self.threshold_,
            "target_fpr_": self.target_fpr_,
        }
        (folder / "fusion.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> FisherFusion:
        folder = Path(directory)
        meta_path = folder / "fusion.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtefactError(f"{meta_path}: cannot read fusion metadata: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION or meta.get("fusion") != cls.name:
            raise ArtefactError(
                f"{meta_path}: not a format-{FORMAT_VERSION} '{cls.name}' fusion; re-run tfshield calibrate"
            )
        fusion = cls(**meta["params"])
        try:
            with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
                reference = arrays["reference_"]
        except (OSError, KeyError, ValueError) as exc:
            raise ArtefactError(f"{folder / 'arrays.npz'}: cannot load arrays: {exc}") from None
        if reference.ndim != 2 or len(reference) != len(fusion.members):
            raise ArtefactError(
                f"{folder / 'arrays.npz'}: reference_ has shape {list(reference.shape)}, "
                f"expected ({len(fusion.members)}, n)"
            )
        fusion.fit(dict(zip(fusion.members, reference, strict=True)))
        fusion.threshold_ = float(meta["threshold_"])
        fusion.target_fpr_ = float(meta["target_fpr_"])
        return fusion
