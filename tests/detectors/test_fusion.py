"""Fisher fusion: one threshold at the target FPR over several detectors' benign p-values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors.base import ArtefactError, DetectorError, NotCalibrated
from detectors.fusion import FisherFusion

MEMBERS = ("a", "b", "c")


def correlated_benign(n: int, seed: int) -> dict[str, np.ndarray]:
    """Three detectors' benign scores sharing a common factor (correlation 0.5)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=n)
    return {m: common + rng.normal(size=n) for m in MEMBERS}


def test_false_positive_rate_on_fresh_benign_scores_is_the_target() -> None:
    fusion = FisherFusion(MEMBERS).fit(correlated_benign(1000, seed=0)).calibrate(0.02)
    fresh = correlated_benign(50_000, seed=1)
    fpr = fusion.flagged(fusion.score(fresh)).mean()
    assert 0.01 < fpr < 0.03


def test_moderately_unusual_on_every_member_is_flagged_where_each_alone_is_not() -> None:
    benign = correlated_benign(1000, seed=0)
    fusion = FisherFusion(MEMBERS).fit(benign).calibrate(0.02)
    # At each member's own 99th benign percentile: an OR at 2 %/3 per member flags none of them.
    sample = {m: np.array([np.quantile(benign[m], 0.99)]) for m in MEMBERS}
    per_member = {m: np.quantile(benign[m], 1 - 0.02 / 3) for m in MEMBERS}
    assert not any(sample[m][0] > per_member[m] for m in MEMBERS)
    assert fusion.flagged(fusion.score(sample))[0]


def test_saved_fusion_reloads_with_the_same_scores_without_pickle(tmp_path: Path) -> None:
    fusion = FisherFusion(MEMBERS).fit(correlated_benign(200, seed=0)).calibrate(0.05)
    fusion.save(tmp_path / "fisher")
    with np.load(tmp_path / "fisher" / "arrays.npz", allow_pickle=False) as arrays:
        assert arrays.files == ["reference_"]
    loaded = FisherFusion.load(tmp_path / "fisher")
    probe = correlated_benign(30, seed=4)
    assert loaded.members == MEMBERS
    assert loaded.threshold_ == fusion.threshold_
    assert np.array_equal(loaded.score(probe), fusion.score(probe))


def test_a_missing_member_score_is_an_error_naming_it() -> None:
    fusion = FisherFusion(MEMBERS).fit(correlated_benign(100, seed=0))
    with pytest.raises(DetectorError, match=r"fisher: no scores from member\(s\) \['c'\]"):
        fusion.score({"a": np.zeros(1), "b": np.zeros(1)})


def test_members_must_score_the_same_samples() -> None:
    scores = correlated_benign(100, seed=0)
    scores["c"] = scores["c"][:50]
    with pytest.raises(DetectorError, match="members must score the same benign samples"):
        FisherFusion(MEMBERS).fit(scores)


def test_unfitted_or_uncalibrated_fusion_raises() -> None:
    with pytest.raises(NotCalibrated, match="call fit"):
        FisherFusion(MEMBERS).score({m: np.zeros(1) for m in MEMBERS})
    fitted = FisherFusion(MEMBERS).fit(correlated_benign(100, seed=0))
    with pytest.raises(NotCalibrated, match="calibrate it before saving"):
        fitted.save("unused")


def test_a_folder_without_a_fusion_says_so(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError, match="cannot read fusion metadata"):
        FisherFusion.load(tmp_path)
