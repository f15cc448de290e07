"""``tfshield eval detectors``: attacks on the demo model sent through a real gateway."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.model.calibrate import DEFAULT_DETECTORS
from gateway.model.evaluate import (
    ATTACKS,
    Phase,
    _roc_scores,
    evaluate,
    parse_args,
    parse_detector_counters,
)

EXPOSITION = """\
# HELP tfshield_detector_flags_total Samples flagged, by detector and model.
# TYPE tfshield_detector_flags_total counter
tfshield_detector_flags_total{detector="mahalanobis",model="mnist"} 3.0
tfshield_detector_flags_created{detector="mahalanobis",model="mnist"} 1.7e+09
tfshield_detector_failures_total{reason="detector_error",mode="open"} 2.0
tfshield_requests_total{code="OK",method="Predict",model="mnist"} 9.0
"""


def test_detector_counters_are_read_from_the_exposition_text() -> None:
    assert parse_detector_counters(EXPOSITION) == {
        ("tfshield_detector_flags_total", (("detector", "mahalanobis"), ("model", "mnist"))): 3.0,
        ("tfshield_detector_failures_total", (("mode", "open"), ("reason", "detector_error"))): 2.0,
    }


def test_goal_covers_fgsm_and_pgd_from_eps_0_1_and_carlini_wagner() -> None:
    assert [a.key for a in ATTACKS if a.in_goal] == [
        "fgsm_eps0.1", "fgsm_eps0.2", "fgsm_eps0.3", "pgd_eps0.1", "pgd_eps0.2", "pgd_eps0.3", "cw_l2",
    ]  # fmt: skip


def test_combined_roc_score_is_the_largest_score_in_units_of_its_threshold() -> None:
    class Threshold:
        def __init__(self, threshold_: float) -> None:
            self.threshold_ = threshold_

    phase = Phase("p", "p", np.zeros((3, 1)))
    phase.offline_scores = {
        "validation": np.array([0.0, 0.0, 0.5]),
        "a": np.array([1.0, 4.0, 0.0]),
        "b": np.array([3.0, 1.0, 0.0]),
    }
    detectors = {"validation": Threshold(0.0), "a": Threshold(2.0), "b": Threshold(1.0)}
    assert _roc_scores(phase, "combined", detectors).tolist() == [3.0, 2.0, np.inf]


def test_the_command_takes_detectors_and_defaults_to_the_full_run() -> None:
    args = parse_args(["detectors"])
    assert (args.quick, args.out) == (False, Path("eval-results/detectors"))
    # The 2 % goal split evenly over the default detectors, so that their union stays within it.
    assert args.target_fpr == pytest.approx(0.02 / len(DEFAULT_DETECTORS))
    with pytest.raises(SystemExit):
        parse_args(["models"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:PyTorch not found:UserWarning")  # ART, on import
def test_quick_eval_sends_attacks_through_the_gateway_and_writes_the_report(
    model_cache_dir, tmp_path
) -> None:
    out = tmp_path / "eval"
    lines: list[str] = []
    report = evaluate(out, cache_dir=model_cache_dir, quick=True, log=lines.append)

    assert report["clean"]["n"] == 24
    assert report["clean"]["errors"] == {} and report["clean"]["failures"] == 0
    assert report["clean"]["accuracy_served"] == report["clean"]["accuracy_in_process"]
    assert set(report["attacks"]) == {a.key for a in ATTACKS}
    sent = sum(a["successful"] for a in report["attacks"].values())
    assert sent > 0
    assert all(a["served_not_adversarial"] == 0 and a["errors"] == {} for a in report["attacks"].values())
    agreement = report["gateway_vs_offline"]
    assert agreement["disagreements"] == 0
    # every digit: every detector and the fusion
    assert agreement["verdicts"] == (24 + sent) * (len(DEFAULT_DETECTORS) + 1)
    assert report["calibration"]["fusion_target_fpr"] == 0.02
    # The verdict: Fisher at 1 % OR margin's own p-value at 1 %.
    assert report["calibration"]["fusion_alone"] == ["margin"]
    assert sorted(report["calibration"]["fusion_part_thresholds"]) == ["fisher", "margin"]
    assert any("for the fusion (fisher OR margin alone, 1.00% each)" in line for line in lines)
    assert any("gateway vs offline verdicts" in line for line in lines)

    assert json.loads((out / "detection_eval.json").read_text()) == report
    assert "| clean (FPR) | 24 |" in (out / "detection_eval.md").read_text()
    for key, attack in report["attacks"].items():
        plot = out / f"roc_{key}.png"
        assert plot.exists() == (attack["successful"] > 0), key
        if attack["successful"]:
            assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(out / "adversarial_examples.npz", allow_pickle=False) as examples:
        assert sum(len(examples[f"x_{key}"]) for key in report["attacks"]) == sent
    assert not (out / "run").exists()  # server logs are removed after a successful run


def test_cw_attacked_in_chunks_finds_what_one_batch_finds_and_reports_progress(model_cache_dir) -> None:
    import dataclasses

    from gateway.model.calibrate import demo_heldout_labels, demo_reference
    from gateway.model.demo import DemoArtifacts
    from gateway.model.evaluate import Budget, art_classifier, run_attacks

    classifier = art_classifier(DemoArtifacts.at(model_cache_dir).export_dir)
    x, y = demo_reference(model_cache_dir).heldout[:12], demo_heldout_labels(model_cache_dir)[:12]
    cw = tuple(a for a in ATTACKS if a.family == "cw_l2")
    # Enough search for some digits to fall (the quick budget's 1 × 5 iterations finds none).
    budget = dataclasses.replace(
        Budget.quick(),
        cw_samples=4,
        cw_chunk=2,
        cw_binary_search_steps=2,
        cw_iterations=20,
        cw_learning_rate=0.05,
    )
    lines: list[str] = []
    chunked = run_attacks(classifier, x, y, budget, lines.append, cw)[0]
    whole = run_attacks(classifier, x, y, dataclasses.replace(budget, cw_chunk=4), lambda _: None, cw)[0]

    assert chunked.attacked == whole.attacked == 4
    assert chunked.successful > 0
    np.testing.assert_array_equal(chunked.x_adv, whole.x_adv)
    np.testing.assert_array_equal(chunked.y_true, whole.y_true)
    assert sum("2/4    digits attacked" in line for line in lines) == 1
