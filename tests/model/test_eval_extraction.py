"""``tfshield eval extraction``: ART thieves steal the demo model through a real gateway."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.model.data import split_mnist
from gateway.model.eval_extraction import (
    CONDITIONS,
    THIEVES,
    PredictOracle,
    Settings,
    _previous_rows,
    _settings_key,
    digests,
    digit_pool,
    epochs_for,
    evaluate,
    goal,
    npd_pool,
    parse_args,
    parse_counters,
    substitute_classifier,
    victim_blackbox,
)
from gateway.policy import Policy
from tests.gateway.conftest import start_gateway
from tests.procs import Proc

SALT = "salt-for-extraction-tests"
ART_IMPORT = pytest.mark.filterwarnings("ignore:PyTorch not found:UserWarning")


def client_id(api_key: str) -> str:
    """The id the gateway gives an API key (gateway/identity.py) under SALT."""
    return "key:" + hmac.new(SALT.encode(), api_key.encode(), hashlib.sha256).hexdigest()[:16]


# -- conditions and the goal --------------------------------------------------------------------


@pytest.mark.parametrize(
    "condition", [c for c in CONDITIONS if c.policy_yaml is not None], ids=lambda c: c.key
)
def test_each_condition_applies_its_defence_to_api_key_clients_only(condition) -> None:
    policy = Policy.from_yaml(condition.policy_yaml)
    thief = policy.decide("mnist", "", "key:0123456789abcdef", (), 0.0)
    benign = policy.decide("mnist", "", "peer:127.0.0.1", (), 0.0)
    expected = {
        "undefended": ("allow", 0),
        "perturb1": ("perturb", 1),
        "perturb2": ("perturb", 2),
        "perturb3": ("perturb", 3),
        "deceive": ("deceive", 0),
    }[condition.key]
    assert (thief.action, thief.level) == expected
    assert benign.action == "allow"


def test_the_default_condition_runs_without_a_policy_file() -> None:
    assert [c.key for c in CONDITIONS if c.policy_yaml is None] == ["default"]


def test_substitutes_see_about_ten_thousand_samples_whatever_the_budget() -> None:
    assert [epochs_for(q) for q in (200, 500, 1000, 2000, 5000)] == [20, 20, 10, 5, 4]
    assert Settings.quick().epochs(5000) == 1


def report_conditions(agreements: dict[str, float], benign: dict[str, tuple[float, float]]) -> dict:
    return {
        key: {
            "rows": [{"thief": t.key, "queries": 5000, "agreement": value} for t in THIEVES],
            "benign": {"accuracy": benign[key][0], "same_top1_as_direct": benign[key][1]},
        }
        for key, value in agreements.items()
    }


def test_goal_holds_when_both_knockoff_thieves_lose_30_points_and_benign_accuracy_is_unchanged() -> None:
    benign = {"undefended": (0.963, 1.0), "default": (0.963, 1.0)}
    met = goal(report_conditions({"undefended": 0.95, "default": 0.60}, benign), 5000)
    assert met["met"] and met["drop_met"] and met["benign_unchanged"]
    assert met["drop"]["knockoff_prob"] == pytest.approx(0.35)

    short = goal(report_conditions({"undefended": 0.95, "default": 0.70}, benign), 5000)
    assert not short["drop_met"] and not short["met"]


def test_goal_fails_when_the_benign_client_loses_accuracy() -> None:
    benign = {"undefended": (0.963, 1.0), "default": (0.950, 0.987)}
    result = goal(report_conditions({"undefended": 0.95, "default": 0.10}, benign), 5000)
    assert result["drop_met"] and not result["benign_unchanged"] and not result["met"]


def test_gateway_decisions_and_monitor_flags_are_read_from_the_exposition() -> None:
    exposition = (
        'tfshield_decisions_total{action="allow",model="mnist"} 7.0\n'
        'tfshield_decisions_total{action="perturb",model="mnist"} 3.0\n'
        'tfshield_decisions_total{action="allow",model="echo"} 9.0\n'
        'tfshield_decisions_created{action="allow",model="mnist"} 1.7e+09\n'
        'tfshield_monitor_flags_total{monitor="prada"} 2.0\n'
    )
    assert parse_counters(exposition) == {
        "calls_by_action": {"allow": 7.0, "perturb": 3.0},
        "monitor_flags": {"prada": 2.0},
    }


def test_a_partial_run_keeps_the_previous_rows_only_when_the_settings_match(tmp_path: Path) -> None:
    path = tmp_path / "extraction_eval.json"
    settings = Settings()
    path.write_text(
        json.dumps({**_settings_key(settings, 0, False), "conditions": {"undefended": {"rows": []}}})
    )
    assert list(_previous_rows(path, settings, 0, False)) == ["undefended"]
    assert _previous_rows(path, settings, 1, False) == {}
    assert _previous_rows(path, Settings(budgets=(500,)), 0, False) == {}
    assert _previous_rows(tmp_path / "missing.json", settings, 0, False) == {}


def test_the_command_line_takes_subsets_of_conditions_and_budgets() -> None:
    args = parse_args(["--conditions", "undefended,default", "--budgets", "500,5000"])
    assert (args.conditions, args.budgets, args.out) == (
        ["undefended", "default"],
        [500, 5000],
        Path("eval-results/extraction"),
    )
    with pytest.raises(SystemExit):
        parse_args(["--conditions", "perturb9"])


def test_tfshield_eval_extraction_runs_this_module(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.model.evaluate import main

    with pytest.raises(SystemExit) as exited:
        main(["extraction", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tfshield eval extraction")


# -- query pools ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
    from gateway.model.data import DEFAULT_SEED

    return split_mnist(DEFAULT_SEED)


def test_the_digit_pool_holds_no_training_or_heldout_digit(split) -> None:
    pool = digit_pool(split.x_validation, 3000, seed=0)
    assert pool.x.shape == (3000, 28, 28, 1) and pool.x.dtype == np.float32
    assert 0.0 <= pool.x.min() and pool.x.max() <= 1.0
    assert set(pool.composition()) == {
        "mnist_validation",
        "sklearn_digits",
        "mnist_validation+affine",
        "sklearn_digits+affine",
    }
    forbidden = set(digests(split.x_train)) | set(digests(split.x_test))
    assert forbidden.isdisjoint(digests(pool.x))


def test_the_digit_pool_is_seeded(split) -> None:
    np.testing.assert_array_equal(
        digit_pool(split.x_validation, 2400, 3).x, digit_pool(split.x_validation, 2400, 3).x
    )


def test_the_non_problem_domain_pool_is_photo_crops() -> None:
    pool = npd_pool(50, seed=0)
    assert pool.x.shape == (50, 28, 28, 1) and 0.0 <= pool.x.min() and pool.x.max() <= 1.0
    assert pool.composition() == {"photo_crop": 50}
    assert len(set(digests(pool.x))) == 50


# -- the thief's pieces ----------------------------------------------------------------------------


@ART_IMPORT
def test_the_substitute_trains_only_on_answered_queries() -> None:
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(8)]
    y[::2] = np.nan  # refused: no answer
    answered = np.arange(8) % 2 == 1
    substitute = substitute_classifier(seed=0, answered=lambda: answered)
    substitute.fit(x, y, batch_size=4, nb_epochs=1)
    assert np.isfinite(substitute.predict(x)).all()


@pytest.fixture(scope="module")
def thief_gateway(model_server: Proc, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("extraction-gateway")
    policy = workdir / "policy.yaml"
    policy.write_text(
        f"""
version: 1
client_groups:
  blocked: {{exact: ["{client_id("blocked-thief")}"]}}
  slow: {{exact: ["{client_id("slow-thief")}"]}}
  thieves: {{prefix: ["key:"]}}
outputs:
  mnist:
    - {{name: probabilities, kind: probabilities}}
    - {{name: logits, kind: logits}}
throttle: {{rate_per_s: 10, burst: 1, mode: reject}}
rules:
  - {{name: blocked-thieves, match: {{groups: [blocked]}}, action: block}}
  - {{name: slow-thieves, match: {{groups: [slow]}}, action: throttle}}
  - {{name: thieves-label-only, match: {{groups: [thieves]}}, action: perturb, level: 3}}
"""
    )
    proc = start_gateway(
        workdir,
        model_server.address(),
        config={"policy": {"file": str(policy)}},
        env={"TFSHIELD_DECEIVE_KEY": "k" * 32, "TFSHIELD_ID_SALT": SALT},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def digits(held_out_digits) -> np.ndarray:
    return held_out_digits[0][:40]


@ART_IMPORT
def test_the_black_box_returns_the_victims_probabilities_through_the_gateway(
    thief_gateway: Proc, model_server: Proc, digits
) -> None:
    with PredictOracle(model_server.address()) as direct, PredictOracle(thief_gateway.address()) as benign:
        expected = direct.predict(digits, batch_size=40)
        served = victim_blackbox(benign).predict(digits, batch_size=16)
        assert benign.calls == 3
        np.testing.assert_array_equal(benign.queries, digits)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-7)
    assert not set(np.unique(served)) <= {0.0, 1.0}


def test_a_label_only_policy_makes_the_thiefs_answers_one_hot(
    thief_gateway: Proc, model_server: Proc, digits
) -> None:
    with (
        PredictOracle(model_server.address()) as direct,
        PredictOracle(thief_gateway.address(), "a-thief") as thief,
    ):
        expected = direct.predict(digits, batch_size=40)
        answers = thief.predict(digits, batch_size=10)
    assert set(np.unique(answers)) == {0.0, 1.0}
    np.testing.assert_array_equal(answers.sum(axis=1), 1.0)
    np.testing.assert_array_equal(answers.argmax(axis=1), expected.argmax(axis=1))


def test_refused_queries_come_back_as_nan_rows_and_are_counted(thief_gateway: Proc, digits) -> None:
    with PredictOracle(thief_gateway.address(), "blocked-thief") as thief:
        answers = thief.predict(digits[:12], batch_size=5)
        assert thief.refused == {"PERMISSION_DENIED": 12} and thief.errors == {}
        assert not thief.answered_mask().any()
    assert answers.shape == (12, 10) and np.isnan(answers).all()


def test_a_patient_client_waits_out_a_throttle_and_an_impatient_one_is_refused(
    thief_gateway: Proc, digits
) -> None:
    with PredictOracle(thief_gateway.address(), "slow-thief", patience_s=5.0) as patient:
        answers = patient.predict(digits[:6], batch_size=1)
        assert patient.retries > 0 and 0 < patient.waited_s <= 5.0 and patient.refused == {}
    assert np.isfinite(answers).all()
    with PredictOracle(thief_gateway.address(), "slow-thief") as impatient:
        impatient.predict(digits[:6], batch_size=1)
        assert impatient.refused.get("RESOURCE_EXHAUSTED", 0) > 0 and impatient.retries == 0


# -- the whole run ----------------------------------------------------------------------------------


@pytest.mark.slow
@ART_IMPORT
def test_quick_eval_reports_every_condition_thief_and_budget(model_cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "extraction"
    lines: list[str] = []
    report = evaluate(out, cache_dir=model_cache_dir, quick=True, log=lines.append)

    assert list(report["conditions"]) == [c.key for c in CONDITIONS]
    budgets = Settings.quick().budgets
    for key, condition in report["conditions"].items():
        runs = {(row["thief"], row["queries"]) for row in condition["rows"]}
        assert runs == {(t.key, q) for t in THIEVES for q in budgets}, key
        for row in condition["rows"]:
            assert row["errors"] == {}
            for name in ("agreement", "stolen_accuracy", "answer_top1_fidelity"):
                assert 0.0 <= row[name] <= 1.0, (key, row["thief"], name)
        benign = condition["benign"]
        # Every condition leaves the benign client (no API key) alone.
        assert benign["same_top1_as_direct"] == 1.0 and 0.0 <= benign["accuracy"] <= 1.0
    fidelity = {
        key: {row["answer_top1_fidelity"] for row in c["rows"]} for key, c in report["conditions"].items()
    }
    answered = {key: {row["answered"] for row in c["rows"]} for key, c in report["conditions"].items()}
    assert all(answered[key] == {1.0} for key in answered if key != "default")  # only monitors refuse
    assert fidelity["perturb1"] == fidelity["perturb3"] == {1.0}  # perturbation keeps the top-1 class
    assert max(fidelity["deceive"]) < 0.2  # deception changes it
    assert report["goal"]["condition"] == "default" and isinstance(report["goal"]["met"], bool)
    default = report["conditions"]["default"]
    assert default["gateway_config"]["monitors"]["models"][0]["model"] == "mnist"
    assert set(default["monitors"]["thresholds"]) >= {"prada", "blacklight"}
    for name in ("extraction_eval.json", "extraction_eval.md", "extraction_agreement.png"):
        assert (out / name).stat().st_size > 0
    table = "\n".join(lines)
    assert all(c.label in table for c in CONDITIONS) and "goal (default policy" in table
    assert not (out / "run").exists()
