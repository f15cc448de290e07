"""``tfshield eval monitors``: query-based attacks and a benign crowd through one monitored gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.model.eval_monitors import (
    EVASION,
    EXTRACTION,
    client_id,
    evaluate,
    main,
    recording_policy_yaml,
)
from gateway.policy import Policy

ART_IMPORT = pytest.mark.filterwarnings("ignore:PyTorch not found:UserWarning")


def test_recording_policy_allows_at_every_risk() -> None:
    policy = Policy.from_yaml(recording_policy_yaml(), "<eval>")
    assert policy.spec.ladder.shadow is True


def test_client_ids_are_keyed_hashes_of_the_api_key() -> None:
    assert client_id("a").startswith("key:") and len(client_id("a")) == 4 + 16
    assert client_id("a") != client_id("b")


def test_unknown_attack_names_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--attacks", "nope"]) == 2
    assert "known: hopskipjump" in capsys.readouterr().err


@pytest.mark.slow
@ART_IMPORT
def test_quick_run_reports_every_attack_and_benign_population(model_cache_dir: Path, tmp_path: Path) -> None:
    report = evaluate(tmp_path, model_cache_dir, quick=True, log=lambda line: None)
    assert [a["attack"] for a in report["attacks"]] == list(EVASION + EXTRACTION)
    for attack in report["attacks"]:
        assert attack["clients"] >= 1 and not attack["errors"], attack
        assert len(attack["queries_to_flag"]) == attack["clients"] == len(attack["progress_at_flag"])
        assert max(attack["queries_sent"]) > 0
    assert set(report["benign"]) == {"random", "heavy", "resend"}
    assert report["benign"]["heavy"]["queries_max"] == report["budget"]["extraction_queries"]
    assert set(report["goals"]) >= {"every_attack_detected", "no_benign_client_flagged"}
    assert json.loads((tmp_path / "monitors_eval.json").read_text())["quick"] is True
    assert (tmp_path / "monitors_eval.md").read_text().startswith("# tfshield eval monitors")
    assert (tmp_path / "risk_over_queries.png").stat().st_size > 0
