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
    F(x) = −2 Σ_d ln p_d(x)

(the conformal p-value: Vovk, Gammerman & Shafer, "Algorithmic Learning in a
Random World", 2005), higher = more anomalous. Fisher's χ² reference
distribution would need independent detectors, which these are not, so the
threshold is not taken from χ²: it is the target-FPR quantile of the fused
statistic of the calibration samples themselves, each with leave-one-out
p-values (its own score left out of its reference), which are exchangeable
with a new benign sample's. The false-positive rate is therefore the target
whatever the detectors' correlation.

The p-value floor, and ``alone``. A conformal p-value cannot go below
1/(n + 1), so one member, however extreme, adds at most 2 ln(n + 1) to F
(13.8 for n = 1,000, against a threshold of 26.5 at 2 % over five members on
the demo model): Fisher cannot flag a sample that only ONE detector finds
extreme. CW-L2 at confidence 0 and DeepFool stop on the decision boundary,
where ``margin`` alone sees them and the other members often do not. Members
named in ``alone`` may therefore flag by themselves: the verdict is

    F(x) > t_F   OR   −2 ln p_m(x) > t_m  for any m in alone

with the budget split evenly, fpr / (1 + len(alone)) per part, each
threshold set like Fisher's (leave-one-out on the calibration samples), so
the union bound keeps the false-positive rate at most fpr. ``score`` is the
largest part statistic in units of its threshold, so ``threshold_`` is 1.0
and a score above it is a flag (without ``alone``: F / t_F).

What it assumes: the member detectors scored the SAME benign calibration
samples (rows aligned); every member scores every request (a member that
failed leaves the fusion unscored, which the gateway's failure mode handles).
What ``alone`` does not buy: margin sees CW-L2 only because κ = 0 puts its
examples on the boundary; CW at κ > 0, or any attacker who knows the verdict,
leaves it on purpose.

Measured on the demo model (1,000 calibration digits, 500 held-out, the
successful attacks of the evaluation's earlier, short CW-L2 schedule of
3 × 10 iterations) over Mahalanobis, feature squeezing, the
autoencoder, margin and MagNet's JSD at 2 % target. Fisher alone: CW-L2
77.6 % (the OR of the same five at 0.4 % each: 64.5 %), DeepFool 95 %,
FGSM/PGD at ε ≥ 0.1 100 %, held-out FPR 1.6 %. With ``alone=("margin",)``
(Fisher at 1 % OR margin at 1 %; ``tfshield eval detectors`` through the
gateway, every verdict as offline): CW-L2 88.2 % (67/76), DeepFool 100 %,
FGSM/PGD at ε ≥ 0.1 100 %, held-out FPR 1.4 % (7/500). Min-p instead of
Fisher (−min ln p) behaves like the OR (64.5 %). Letting every member flag
alone does worse (Fisher at 1 % OR any of six at 1 %/6: CW-L2 61.8 %): with
1,000 calibration samples a member then fires only above every benign score,
so its share of the budget buys nothing; margin is the one member that sees
boundary examples. With the evaluation's current CW-L2 schedule (5 × 100
iterations at learning rate 0.01, 200 digits), the same verdict flags 95.5 %
(189/198) of CW-L2 at 1.4 % held-out FPR (96.0 %, 190/198, while the
Mahalanobis member kept 50 components instead of 30).

Saved like a detector: ``fusion.json`` (name, format version, members, alone,
each part's threshold) and ``arrays.npz`` (``reference_``, members × n,
float64), never pickle. Format 1 (before ``alone``) still loads, as a fusion
without ``alone``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

import numpy as np

from detectors.base import (
    ArtefactError,
    DetectorError,
    NotCalibrated,
    read_artefact_json,
    threshold_at_fpr,
    write_artefact_json,
)

__all__ = ["FisherFusion", "deciding"]

# fusion.json's format: 1 had one threshold (Fisher's) and no ``alone``; 2 has a threshold per part.
FUSION_FORMAT_VERSION = 2
READABLE_FUSION_FORMATS = (1, 2)


class FisherFusion:
    """Fisher's combination of the members' benign tail p-values, OR each ``alone`` member's own p-value.

    Hyperparameters: ``members`` (sequence of detector names, at least 2);
    ``alone`` (sequence of member names, default none), members whose own
    tail p-value may flag by itself.

    Learned: ``reference_`` (members × n float64), the members' scores on the
    benign calibration samples, rows aligned (set by ``fit``);
    ``part_thresholds_`` ({"fisher": t_F, member: t_m for m in alone}, each
    part's statistic threshold at fpr / (1 + len(alone))), ``threshold_``
    (1.0: scores are in units of the part thresholds) and ``target_fpr_``
    (the whole budget; set by ``calibrate``).
    """

    name = "fisher"
    params = ("members", "alone")

    reference_: np.ndarray
    part_thresholds_: dict[str, float]
    threshold_: float
    target_fpr_: float

    def __init__(self, members: Sequence[str], alone: Sequence[str] = ()) -> None:
        members = tuple(str(m) for m in members)
        # The Fisher part is keyed by the fusion's name, so no member may take it.
        if len(members) < 2 or len(set(members)) != len(members) or self.name in members:
            raise DetectorError(
                f"fisher: members must name at least 2 distinct detectors, got {list(members)}"
            )
        alone = tuple(str(m) for m in alone)
        if len(set(alone)) != len(alone) or not set(alone) <= set(members):
            raise DetectorError(
                f"fisher: alone must name distinct members ({', '.join(members)}), got {list(alone)}"
            )
        self.members = members
        self.alone = alone

    @property
    def parts(self) -> tuple[str, ...]:
        """The verdict's parts: Fisher's statistic over every member, then each ``alone`` member's."""
        return (self.name, *self.alone)

    @property
    def fitted(self) -> bool:
        return hasattr(self, "reference_")

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "part_thresholds_")

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
        """Set each part's threshold so that at most fpr / (1 + len(alone)) of the calibration samples'
        statistics (leave-one-out p-values) exceed it; at most ``fpr`` are flagged in all."""
        if not self.fitted:
            raise NotCalibrated("fusion 'fisher' is not fitted; call fit(benign_scores) first")
        if not 0.0 < fpr < 1.0:
            raise DetectorError(f"fisher: fpr must be in (0, 1), got {fpr}")
        share = fpr / len(self.parts)
        thresholds = {}
        for part, statistic in self._statistics(self.reference_, leave_one_out=True).items():
            threshold = threshold_at_fpr(statistic, share)
            if not threshold > 0.0:  # only when the member's scores tie on almost every sample
                raise DetectorError(
                    f"fisher: part '{part}' has threshold 0 at FPR {share:.4g}: its members score almost "
                    "every calibration sample alike; drop the constant member"
                )
            thresholds[part] = threshold
        self.part_thresholds_ = thresholds
        self.threshold_ = 1.0
        self.target_fpr_ = float(fpr)
        return self

    def part_scores(self, member_scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each part's statistic (n,): Fisher's −2 Σ ln p_d over the members; −2 ln p_m per alone member."""
        if not self.fitted:
            raise NotCalibrated("fusion 'fisher' is not fitted; call fit(benign_scores) first")
        missing = [m for m in self.members if m not in member_scores]
        if missing:
            raise DetectorError(f"fisher: no scores from member(s) {missing}")
        rows = np.stack([np.asarray(member_scores[m], dtype=np.float64).ravel() for m in self.members])
        return self._statistics(rows, leave_one_out=False)

    def score(self, member_scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores (n,) from each member's scores (n,) on the same samples: the largest part statistic in
        units of its threshold; above ``threshold_`` (1.0) is a flag."""
        parts = self.part_scores(member_scores)
        if not self.calibrated:
            raise NotCalibrated("fusion 'fisher' has no threshold; call calibrate(fpr) first")
        return np.max(np.stack([parts[p] / self.part_thresholds_[p] for p in self.parts]), axis=0)

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        if not self.calibrated:
            raise NotCalibrated("fusion 'fisher' has no threshold; call calibrate(fpr) first")
        return scores > self.threshold_

    def _statistics(self, rows: np.ndarray, leave_one_out: bool) -> dict[str, np.ndarray]:
        n = self._sorted.shape[1]
        fisher = np.zeros(rows.shape[1])
        terms: dict[str, np.ndarray] = {}
        for member, sorted_row, scores in zip(self.members, self._sorted, rows, strict=True):
            # A NaN score is treated as the most anomalous possible (smallest p-value).
            scores = np.where(np.isnan(scores), np.inf, scores)
            at_least = n - np.searchsorted(sorted_row, scores, side="left")
            if leave_one_out:  # the sample is in the reference: (1 + #others ≥ s) / ((n − 1) + 1)
                p = at_least / n
            else:
                p = (1.0 + at_least) / (n + 1.0)
            terms[member] = -2.0 * np.log(p)
            fisher += terms[member]
        return {self.name: fisher, **{m: terms[m] for m in self.alone}}

    # -- artefacts ---------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        if not self.calibrated:
            raise NotCalibrated("fusion 'fisher' has no threshold; calibrate it before saving")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "arrays.npz", reference_=self.reference_)
        meta = {
            "fusion": self.name,
            "format_version": FUSION_FORMAT_VERSION,
            "params": {"members": list(self.members), "alone": list(self.alone)},
            "part_thresholds_": self.part_thresholds_,
            "threshold_": self.threshold_,
            "target_fpr_": self.target_fpr_,
        }
        write_artefact_json(folder / "fusion.json", meta)
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> FisherFusion:
        folder = Path(directory)
        meta_path = folder / "fusion.json"
        meta = read_artefact_json(meta_path, "fusion metadata")
        version = meta.get("format_version")
        if version not in READABLE_FUSION_FORMATS or meta.get("fusion") != cls.name:
            raise ArtefactError(
                f"{meta_path}: not a '{cls.name}' fusion of format "
                f"{' or '.join(map(str, READABLE_FUSION_FORMATS))}; re-run tfshield calibrate"
            )
        try:
            fusion = cls(**meta["params"])
            # Format 1 had no alone members: its one threshold is Fisher's.
            thresholds = {cls.name: meta["threshold_"]} if version == 1 else dict(meta["part_thresholds_"])
            part_thresholds = {part: float(thresholds[part]) for part in fusion.parts}
            target_fpr = float(meta["target_fpr_"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(
                f"{meta_path}: missing or malformed field {exc}; re-run tfshield calibrate"
            ) from None
        if sorted(thresholds) != sorted(fusion.parts) or not all(t > 0.0 for t in part_thresholds.values()):
            raise ArtefactError(
                f"{meta_path}: part thresholds {thresholds} do not match the parts {list(fusion.parts)} "
                "(each > 0); re-run tfshield calibrate"
            )
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
        fusion.part_thresholds_ = part_thresholds
        fusion.threshold_ = 1.0
        fusion.target_fpr_ = target_fpr
        return fusion


def deciding(names: Iterable[str]) -> list[str]:
    """Of the detectors (and fusion) that judged a call, those whose flags make the verdict.

    With the fusion among them: the fusion and input validation (the fused
    detectors' own flags are recorded only); otherwise every one of them.
    """
    names = list(names)
    if FisherFusion.name not in names:
        return names
    return [name for name in names if name in (FisherFusion.name, "validation")]
