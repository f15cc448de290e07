"""Fisher fusion: one threshold at the target FPR over several detectors' benign p-values."""

from __future__ import annotations

import json
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


def test_a_sample_extreme_on_an_alone_member_only_is_flagged_though_fisher_alone_cannot() -> None:
    benign = correlated_benign(1000, seed=0)
    fisher_only = FisherFusion(MEMBERS).fit(benign).calibrate(0.02)
    with_alone = FisherFusion(MEMBERS, alone=("c",)).fit(benign).calibrate(0.02)
    # Above every benign score of c, at the bottom of a and b: c's p-value is at its floor, 1/(n + 1).
    sample = {"a": np.array([benign["a"].min()]), "b": np.array([benign["b"].min()]), "c": np.array([1e6])}
    parts = with_alone.part_scores(sample)
    assert parts["c"][0] == pytest.approx(2 * np.log(1001))
    # a and b add nothing (p = 1); one floored p-value stays under Fisher's threshold.
    assert parts["fisher"][0] == pytest.approx(2 * np.log(1001))
    assert fisher_only.part_thresholds_["fisher"] > 2 * np.log(1001)
    assert not fisher_only.flagged(fisher_only.score(sample))[0]
    assert with_alone.flagged(with_alone.score(sample))[0]


def test_with_alone_members_fisher_still_flags_what_is_moderately_unusual_on_every_member() -> None:
    benign = correlated_benign(1000, seed=0)
    fusion = FisherFusion(MEMBERS, alone=("c",)).fit(benign).calibrate(0.02)
    sample = {m: np.array([np.quantile(benign[m], 0.985)]) for m in MEMBERS}
    parts = fusion.part_scores(sample)
    assert parts["c"][0] <= fusion.part_thresholds_["c"]
    assert fusion.flagged(fusion.score(sample))[0]


def test_combined_fpr_with_alone_members_on_fresh_benign_scores_is_within_sampling_error() -> None:
    fpr, n_calibration, n_fresh = 0.02, 1000, 50_000
    fusion = (
        FisherFusion(MEMBERS, alone=("b", "c")).fit(correlated_benign(n_calibration, seed=0)).calibrate(fpr)
    )
    fresh = correlated_benign(n_fresh, seed=1)
    share = fpr / 3
    # Each part spends its share of the budget (3σ of the calibration's and the fresh sample's error) ...
    sigma_part = np.sqrt(share * (1 - share) * (1 / n_calibration + 1 / n_fresh))
    parts = fusion.part_scores(fresh)
    for part in fusion.parts:
        part_fpr = (parts[part] > fusion.part_thresholds_[part]).mean()
        assert abs(part_fpr - share) <= 3 * sigma_part, part
    # ... and the union stays within the whole budget.
    combined = fusion.flagged(fusion.score(fresh)).mean()
    sigma = np.sqrt(fpr * (1 - fpr) * (1 / n_calibration + 1 / n_fresh))
    assert share < combined <= fpr + 3 * sigma
    assert fusion.threshold_ == 1.0


def test_alone_must_name_members() -> None:
    with pytest.raises(DetectorError) as raised:
        FisherFusion(MEMBERS, alone=("margin",))
    assert str(raised.value) == "fisher: alone must name distinct members (a, b, c), got ['margin']"


@pytest.mark.parametrize("alone", [(), ("c",)])
def test_saved_fusion_reloads_bit_identically_without_pickle(tmp_path: Path, alone: tuple[str, ...]) -> None:
    fusion = FisherFusion(MEMBERS, alone).fit(correlated_benign(200, seed=0)).calibrate(0.05)
    fusion.save(tmp_path / "fisher")
    with np.load(tmp_path / "fisher" / "arrays.npz", allow_pickle=False) as arrays:
        assert arrays.files == ["reference_"]
    loaded = FisherFusion.load(tmp_path / "fisher")
    probe = correlated_benign(30, seed=4)
    probe["c"][:3] = [1e9, np.nan, -1e9]  # beyond the benign range both ways, and a failed score
    assert (loaded.members, loaded.alone) == (MEMBERS, alone)
    assert loaded.part_thresholds_ == fusion.part_thresholds_
    assert (loaded.threshold_, loaded.target_fpr_) == (fusion.threshold_, fusion.target_fpr_)
    assert np.array_equal(loaded.reference_, fusion.reference_)
    assert np.array_equal(loaded.score(probe), fusion.score(probe))
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "fusion.json").read_text() == (
        tmp_path / "fisher" / "fusion.json"
    ).read_text()


def test_a_format_1_fusion_without_alone_loads_and_flags_as_fisher_did(tmp_path: Path) -> None:
    benign = correlated_benign(300, seed=0)
    threshold = 12.5
    # What tfshield wrote before ``alone`` existed: one threshold, Fisher's statistic's.
    folder = tmp_path / "fisher"
    folder.mkdir()
    np.savez(folder / "arrays.npz", reference_=np.stack([benign[m] for m in MEMBERS]))
    old_meta = {
        "format_version": 1,
        "fusion": "fisher",
        "params": {"members": list(MEMBERS)},
        "target_fpr_": 0.05,
        "threshold_": threshold,
    }
    (folder / "fusion.json").write_text(json.dumps(old_meta, indent=2, sort_keys=True))

    loaded = FisherFusion.load(folder)

    assert (loaded.alone, loaded.part_thresholds_, loaded.target_fpr_) == ((), {"fisher": threshold}, 0.05)
    probe = correlated_benign(2000, seed=5)
    n = 300
    fisher = -2 * sum(
        np.log((1 + (benign[m][None, :] >= probe[m][:, None]).sum(axis=1)) / (n + 1)) for m in MEMBERS
    )
    assert 0 < (fisher > threshold).sum() < len(fisher)
    assert np.array_equal(loaded.flagged(loaded.score(probe)), fisher > threshold)


def test_an_unknown_format_says_to_recalibrate(tmp_path: Path) -> None:
    fusion = FisherFusion(MEMBERS).fit(correlated_benign(100, seed=0)).calibrate(0.05)
    meta_path = fusion.save(tmp_path / "fisher") / "fusion.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtefactError) as raised:
        FisherFusion.load(tmp_path / "fisher")
    assert (
        str(raised.value) == f"{meta_path}: not a 'fisher' fusion of format 1 or 2; re-run tfshield calibrate"
    )


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
    with pytest.raises(NotCalibrated, match=r"has no threshold; call calibrate\(fpr\) first"):
        fitted.score({m: np.zeros(1) for m in MEMBERS})
    with pytest.raises(NotCalibrated, match="calibrate it before saving"):
        fitted.save("unused")


def test_a_folder_without_a_fusion_says_so(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError, match="cannot read fusion metadata"):
        FisherFusion.load(tmp_path)
