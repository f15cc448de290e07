"""The policy: validated at load with errors naming the key, decided fast, swapped atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectors.base import Detection
from gateway.errors import ConfigError
from gateway.policy import (
    DEFAULT_POLICY_YAML,
    Decision,
    Policy,
    PolicyConfig,
    PolicyError,
    PolicyHolder,
)


@dataclass(frozen=True)
class Verdict:
    """A monitor's verdict (the shape of detectors.monitor.MonitorResult)."""

    monitor: str
    score: float
    flagged: bool
    risk: float


def flagged(name: str, score: float = 2.0, threshold: float = 1.0) -> Detection:
    return Detection(name, np.array([0.1, score]), np.array([False, score > threshold]), threshold)


def clean(name: str) -> Detection:
    return Detection(name, np.array([0.1, 0.2]), np.array([False, False]), 1.0)


def policy(text: str) -> Policy:
    return Policy.from_yaml(text)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "rules: [{name: a, action: block, when: {risk_at_least: 2}}]",
            "rules.0.when.risk_at_least: must be between 0 and 1",
        ),
        (
            "rules: [{name: a, action: allow}, {name: b, action: allow},"
            " {name: c, action: block, when: {risk_below: -1}}]",
            "rules.2.when.risk_below: must be between 0 and 1",
        ),
        (
            "rules: [{name: a, action: block, when: {risk_at_least: 0.5, risk_below: 0.5}}]",
            "rules.0.when.risk_below: must be > risk_at_least",
        ),
        ("rules: [{name: a, action: perturb}]", "rules.0.level: perturb needs a level"),
        (
            "rules: [{name: a, action: block, level: 2}]",
            "rules.0.level: only perturb takes a level, not block",
        ),
        (
            "rules: [{name: a, action: perturb, level: 7}]",
            "rules.0.level: perturb level 7 is not defined; defined: 1, 2, 3",
        ),
        (
            "rules: [{name: a, action: nope}]",
            "rules.0.action: must be one of allow, perturb, deceive, throttle, block, not 'nope'",
        ),
        ("rules: [{action: block}]", "rules.0.name: required key is missing"),
        (
            "rules: [{name: a, action: block}, {name: a, action: allow}]",
            "rules.1.name: 'a' is already the name of rules.0",
        ),
        (
            "rules: [{name: a, action: block, match: {groups: [vip]}}]",
            "rules.0.match.groups.0: unknown client group 'vip'; defined: default",
        ),
        (
            "rules: [{name: a, action: block, match: {model: [m]}}]",
            "rules.0.match.model: unknown key; known keys here: groups, models, signatures",
        ),
        ("rules: [{name: a, action: block, shadow: 'yes'}]", "rules.0.shadow: must be bool, not 'yes'"),
        (
            "client_groups: {default: {exact: [a]}}",
            "client_groups.default: is reserved for clients in no group",
        ),
        ("client_groups: {vip: {}}", "client_groups.vip: needs at least one of exact, prefix, glob"),
        (
            "client_groups: {vip: {prefix: ['']}}",
            "client_groups.vip.prefix.0: must not be empty (it would match every client)",
        ),
        ("ladder: {steps: [{risk_at_least: 0.1, action: allow}]}", "ladder.steps.0.risk_at_least: must be 0"),
        (
            "ladder: {steps: [{risk_at_least: 0, action: allow}, {risk_at_least: 0, action: block}]}",
            "ladder.steps.1.risk_at_least: must be greater than the previous step's",
        ),
        ("ladder: {steps: []}", "ladder.steps: needs at least one step"),
        ("ladder: {deceive: {risk_at_least: 1.5}}", "ladder.deceive.risk_at_least: must be between 0 and 1"),
        ("perturb_levels: {1: [{kind: top_k}]}", "perturb_levels.1.0.k: top_k needs k"),
        (
            "perturb_levels: {1: [{kind: top_k, k: 2, sigma: 0.1}]}",
            "perturb_levels.1.0.sigma: not a parameter of top_k",
        ),
        (
            "perturb_levels: {1: [{kind: rounding, decimals: 9}]}",
            "perturb_levels.1.0.decimals: must be between 0 and 6",
        ),
        (
            "perturb_levels: {1: [{kind: reverse_sigmoid, beta: 1.5, gamma: 0.5}]}",
            "perturb_levels.1.0.beta: must be in (0, 1]",
        ),
        ("perturb_levels: {0: [{kind: label_only}]}", "perturb_levels.0: levels are numbered from 1"),
        ("perturb_levels: {1: []}", "perturb_levels.1: needs at least one perturbation"),
        (
            "perturb_levels: {1: [{kind: blur}]}",
            "perturb_levels.1.0.kind: must be one of top_k, rounding, label_only, reverse_sigmoid, noise,"
            " not 'blur'",
        ),
        (
            "perturb_levels: {1: [{kind: label_only}]}",
            "ladder.steps.2.level: perturb level 2 is not defined; defined: 1",
        ),
        (
            "outputs: {m: [{name: probs, kind: scores}]}",
            "outputs.m.0.kind: must be one of probabilities, logits, labels, not 'scores'",
        ),
        (
            "outputs: {m: [{name: classes, kind: labels}]}",
            "outputs.m.0.classes: labels outputs need classes >= 2 or names",
        ),
        (
            "outputs: {m: [{name: classes, kind: labels, classes: 3, names: [a, b]}]}",
            "outputs.m.0.names: must have `classes` names",
        ),
        (
            "outputs: {m: [{name: probs, kind: probabilities, names: [a, b]}]}",
            "outputs.m.0.names: only labels outputs take names, not probabilities",
        ),
        ("outputs: {m: [{name: p}, {name: p}]}", "outputs.m: names an output twice"),
        ("throttle: {rate_per_s: 0}", "throttle.rate_per_s: must be > 0"),
        ("failure: {audit: maybe}", "failure.audit: must be one of open, closed, not 'maybe'"),
        ("version: 2", "version: must be one of 1, not 2"),
        (
            "rulez: []",
            "rulez: unknown key; known keys here: client_groups, deceive, failure, ladder, outputs, "
            "perturb_levels, rules, throttle, version",
        ),
        ("[1, 2]", "policy: must be a mapping, not list"),
        ("rules: [a: b", "not valid YAML: line 1, column 13: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_key_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as error:
        Policy.from_yaml(text)
    assert str(error.value) == message


def test_policy_errors_are_config_errors() -> None:
    assert issubclass(PolicyError, ConfigError)


def test_a_policy_file_error_starts_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [{name: a, action: perturb}]\n")
    with pytest.raises(PolicyError) as error:
        Policy.from_file(path)
    assert str(error.value) == f"{path}: rules.0.level: perturb needs a level"
    with pytest.raises(PolicyError) as error:
        Policy.from_file(tmp_path / "missing.yaml")
    assert (
        str(error.value) == f"{tmp_path / 'missing.yaml'}: cannot read policy file: No such file or directory"
    )


def test_the_default_policy_is_the_documented_yaml() -> None:
    default = Policy.default()
    assert default.text == DEFAULT_POLICY_YAML
    assert default.sha256 == Policy.from_yaml(DEFAULT_POLICY_YAML).sha256
    assert Policy.from_yaml("").spec == default.spec  # an empty file is the defaults
    assert default.failure.audit == "closed" and default.failure.perturb == "closed"


# -- the ladder ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "risk, action, level, rule",
    [
        (0.0, "allow", 0, "ladder.0"),
        (0.29, "allow", 0, "ladder.0"),
        (0.3, "perturb", 1, "ladder.1"),
        (0.59, "perturb", 1, "ladder.1"),
        (0.6, "perturb", 2, "ladder.2"),
        (0.8, "throttle", 0, "ladder.3"),
        (0.95, "block", 0, "ladder.4"),
        (1.0, "block", 0, "ladder.4"),
    ],
)
def test_the_default_ladder_escalates_with_client_risk(
    risk: float, action: str, level: int, rule: str
) -> None:
    decision = Policy.default().decide("mnist", "", "peer:10.0.0.1", [], risk)
    assert (decision.action, decision.level, decision.rule) == (action, level, rule)


def test_a_plain_allow_carries_no_scores_and_is_not_recorded() -> None:
    decision = Policy.default().decide("mnist", "", "peer:10.0.0.1", [flagged("mahalanobis")], 0.1)
    assert decision == Decision("allow", 0, "ladder.0")
    assert not decision.recorded


def test_a_non_allow_decision_carries_the_scores_behind_it() -> None:
    decision = Policy.default().decide(
        "mnist",
        "",
        "c",
        [flagged("mahalanobis", score=3.0, threshold=2.0)],
        0.7,
        [Verdict("rate", 5.0, True, 0.7)],
    )
    assert decision.recorded
    assert dict(decision.scores) == {"risk": 0.7, "mahalanobis": 1.5, "monitor:rate": 0.7}


def test_an_extraction_flagged_client_is_deceived_instead_of_perturbed_throttled_or_blocked() -> None:
    extraction = [Verdict("prada", 9.0, True, 0.9)]
    default = Policy.default()
    for risk in (0.6, 0.85, 0.99):
        decision = default.decide("mnist", "", "c", [], risk, extraction)
        assert (decision.action, decision.rule) == ("deceive", "ladder.deceive")
    # Below deceive.risk_at_least the ladder's step stands.
    assert default.decide("mnist", "", "c", [], 0.4, extraction).action == "perturb"
    # Other flags do not deceive: evasion-style risk still blocks.
    assert default.decide("mnist", "", "c", [flagged("autoencoder")], 0.99).action == "block"
    # A monitor that did not flag this call does not deceive.
    assert default.decide("mnist", "", "c", [], 0.99, [Verdict("prada", 0.1, False, 0.9)]).action == "block"


def test_deception_in_the_ladder_can_be_switched_off() -> None:
    no_deceive = policy("ladder: {deceive: null}")
    assert no_deceive.decide("m", "", "c", [], 0.99, [Verdict("prada", 9.0, True, 0.9)]).action == "block"


# -- rules -------------------------------------------------------------------------------------

RULES = """
client_groups:
  partners: {exact: ["mtls:partner-a"], prefix: ["mtls:partner-"]}
  internal: {prefix: ["mtls:internal-"], glob: ["mtls:spiffe://prod/*/batch"]}
rules:
  - name: partners-allowed
    match: {groups: [partners]}
    action: allow
  - name: squeezed-block
    match: {models: [mnist], signatures: [serving_default]}
    when: {flagged: [feature_squeezing]}
    action: block
  - name: risky-internal
    match: {groups: [internal]}
    when: {risk_at_least: 0.5, risk_below: 0.9}
    action: perturb
    level: 3
  - name: anything-flagged-on-fraud
    match: {models: [fraud]}
    when: {flagged: ["*"]}
    action: deceive
"""


@pytest.mark.parametrize(
    "client, group",
    [
        ("mtls:partner-a", "partners"),
        ("mtls:partner-b", "partners"),
        ("mtls:internal-x", "internal"),
        ("mtls:spiffe://prod/ns1/batch", "internal"),
        ("mtls:spiffe://prod/ns1/batch/extra", "default"),  # globs match the whole id
        ("key:0123456789abcdef", "default"),
    ],
)
def test_clients_are_grouped_by_exact_id_prefix_and_glob(client: str, group: str) -> None:
    assert policy(RULES).group_of(client) == group


def test_an_exact_id_beats_a_prefix_and_the_longest_prefix_wins() -> None:
    groups = policy(
        """
client_groups:
  broad: {prefix: ["mtls:"]}
  narrow: {prefix: ["mtls:team-"]}
  one: {exact: ["mtls:team-x"], glob: ["peer:*"]}
"""
    )
    assert groups.group_of("mtls:team-x") == "one"
    assert groups.group_of("mtls:team-y") == "narrow"
    assert groups.group_of("mtls:other") == "broad"
    assert groups.group_of("peer:1.2.3.4") == "one"


def test_the_first_matching_rule_decides() -> None:
    rules = policy(RULES)
    # A partner is allowed even when flagged and risky.
    decision = rules.decide("mnist", "", "mtls:partner-a", [flagged("feature_squeezing")], 0.99)
    assert (decision.action, decision.rule, decision.group) == ("allow", "partners-allowed", "partners")
    # Anyone else flagged by squeezing on mnist's default signature is blocked
    # ("" resolves to serving_default).
    assert rules.decide("mnist", "", "peer:1", [flagged("feature_squeezing")], 0.0).rule == "squeezed-block"
    assert (
        rules.decide("mnist", "serving_default", "peer:1", [flagged("feature_squeezing")], 0.0).action
        == "block"
    )


def test_a_rule_matches_only_its_models_signatures_and_flags() -> None:
    rules = policy(RULES)
    assert (
        rules.decide("mnist", "other_sig", "peer:1", [flagged("feature_squeezing")], 0.0).rule == "ladder.0"
    )
    assert rules.decide("other", "", "peer:1", [flagged("feature_squeezing")], 0.0).rule == "ladder.0"
    assert rules.decide("mnist", "", "peer:1", [clean("feature_squeezing")], 0.0).rule == "ladder.0"
    assert rules.decide("mnist", "", "peer:1", [flagged("mahalanobis")], 0.0).rule == "ladder.0"


def test_a_risk_window_bounds_a_rule() -> None:
    rules = policy(RULES)
    client = "mtls:internal-x"
    assert rules.decide("m", "", client, [], 0.49).rule == "ladder.1"
    decision = rules.decide("m", "", client, [], 0.5)
    assert (decision.action, decision.level, decision.rule) == ("perturb", 3, "risky-internal")
    assert rules.decide("m", "", client, [], 0.9).rule == "ladder.3"


def test_remembered_quiet_decisions_are_the_ones_deciding_afresh_gives() -> None:
    rules = policy(RULES + "ladder:\n  shadow: true\n")
    fresh = policy(RULES + "ladder:\n  shadow: true\n")
    clients = ["mtls:partner-a", "mtls:internal-x", "peer:1", "mtls:spiffe://prod/a/batch"]
    grid = [
        (model, signature, client, risk)
        for model in ("mnist", "fraud", "other")
        for signature in ("", "serving_default", "other_sig")
        for client in clients
        for risk in (0.0, 0.49, 0.5, 0.85, 0.9, 0.97)
    ]
    for _ in range(2):  # the second pass answers from the cache
        for model, signature, client, risk in grid:
            remembered = rules.decide(model, signature, client, [], risk)
            group = fresh.group_of(client)
            assert remembered == fresh._decide(model, signature or "serving_default", group, (), risk, ())
    # Detections and monitor results are never answered from the cache.
    assert rules.decide("mnist", "", "peer:1", [flagged("feature_squeezing")], 0.0).action == "block"


def test_the_quiet_decision_cache_is_bounded(monkeypatch) -> None:
    from gateway import policy as policy_module

    monkeypatch.setattr(policy_module, "_QUIET_CACHE_SIZE", 8)
    rules = policy(RULES)
    for index in range(100):
        rules.decide(f"model-{index}", "", "peer:1", [], 0.0)  # model names come from clients
    assert len(rules._quiet_cache) <= 8


def test_a_star_matches_any_flagged_detector_or_monitor() -> None:
    rules = policy(RULES)
    assert rules.decide("fraud", "", "peer:1", [flagged("mahalanobis")], 0.0).action == "deceive"
    assert rules.decide("fraud", "", "peer:1", [], 0.0, [Verdict("rate", 3.0, True, 0.1)]).action == "deceive"
    assert rules.decide("fraud", "", "peer:1", [clean("mahalanobis")], 0.0).action == "allow"


def test_the_policy_lists_the_detector_names_it_refers_to() -> None:
    assert policy(RULES).detector_names == {"feature_squeezing", "prada", "class_coverage", "ood_rate"}


# -- shadow --------------------------------------------------------------------------------------


def test_a_shadow_rule_is_recorded_but_not_applied_and_evaluation_goes_on() -> None:
    shadowed = policy(
        """
rules:
  - {name: try-block, action: block, when: {flagged: [mahalanobis]}, shadow: true}
  - {name: perturb-flagged, action: perturb, level: 1, when: {flagged: [mahalanobis]}}
"""
    )
    decision = shadowed.decide("m", "", "peer:1", [flagged("mahalanobis")], 0.0)
    assert (decision.action, decision.rule, decision.shadow) == ("perturb", "perturb-flagged", False)
    (record,) = decision.shadowed
    assert (record.action, record.rule, record.shadow) == ("block", "try-block", True)
    assert record.scores["mahalanobis"] == 2.0


def test_a_shadow_rule_over_an_allow_still_makes_the_call_recorded() -> None:
    shadowed = policy("rules: [{name: try-block, action: block, shadow: true}]")
    decision = shadowed.decide("m", "", "peer:1", [], 0.0)
    assert decision.action == "allow" and decision.recorded
    assert decision.shadowed[0].rule == "try-block"


def test_a_shadow_ladder_allows_and_records_what_it_would_have_done() -> None:
    shadow_ladder = policy("ladder: {shadow: true}")
    decision = shadow_ladder.decide("m", "", "peer:1", [], 0.97)
    assert (decision.action, decision.rule) == ("allow", "ladder.shadow")
    assert [(d.action, d.rule, d.shadow) for d in decision.shadowed] == [("block", "ladder.4", True)]
    assert shadow_ladder.decide("m", "", "peer:1", [], 0.1) == Decision("allow", 0, "ladder.0")


# -- speed ------------------------------------------------------------------------------------------


def test_a_typical_decision_takes_microseconds() -> None:
    rules = policy(RULES)
    detections = [clean("mahalanobis"), clean("feature_squeezing")]
    calls = 2000

    def per_call_us(risk: float) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                rules.decide("mnist", "", "key:0123456789abcdef", detections, risk)
            best = min(best, (time.perf_counter() - started) / calls * 1e6)
        return best

    # About 3 µs (allow) and 8 µs (perturb, with scores) on the dev machine; generous for a shared CI core.
    assert per_call_us(0.1) < 20
    assert per_call_us(0.7) < 40


# -- reload ------------------------------------------------------------------------------------------


def test_reload_swaps_the_policy_and_a_decision_taken_before_keeps_the_old_one(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [{name: old-rule, action: block}]\n")
    holder = PolicyHolder.load(str(path), registry)
    in_flight = holder.current  # what a call in flight holds
    before = in_flight.decide("m", "", "c", [], 0.0)

    path.write_text("rules: [{name: new-rule, action: allow}]\n")
    new = holder.reload()
    assert holder.current is new and new.decide("m", "", "c", [], 0.0).rule == "new-rule"
    assert before.rule == "old-rule" and in_flight.decide("m", "", "c", [], 0.0).rule == "old-rule"
    assert registry.get_sample_value("tfshield_policy_reloads_total", {"outcome": "ok"}) == 1


def test_a_bad_reload_is_refused_with_the_reason_and_the_old_policy_stays(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    holder = PolicyHolder(Policy.from_yaml("rules: [{name: keep-me, action: block}]"), None, registry)
    old = holder.current
    with pytest.raises(PolicyError, match=r"^rules\.0\.when\.risk_at_least: must be between 0 and 1$"):
        holder.reload("rules: [{name: x, action: block, when: {risk_at_least: 7}}]")
    assert holder.current is old
    with pytest.raises(PolicyError, match="no policy file is configured"):
        holder.reload()
    assert registry.get_sample_value("tfshield_policy_reloads_total", {"outcome": "invalid"}) == 2
    assert registry.get_sample_value("tfshield_policy_reloads_total", {"outcome": "ok"}) == 0


def test_reload_from_text_records_the_text_and_its_digest() -> None:
    holder = PolicyHolder(Policy.default())
    text = "rules: [{name: a, action: allow}]\n"
    new = holder.reload(text)
    assert new.text == text and len(new.sha256) == 64 and new.loaded_unix_s <= time.time()


# -- the config section --------------------------------------------------------------------------------


def test_the_deceive_key_comes_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DECEIVE_KEY", "0123456789abcdef-secret")
    assert PolicyConfig(deceive_key_env="TEST_DECEIVE_KEY").deceive_key() == b"0123456789abcdef-secret"
    monkeypatch.delenv("TEST_DECEIVE_KEY")
    assert PolicyConfig(deceive_key_env="TEST_DECEIVE_KEY").deceive_key() is None
    key_file = tmp_path / "key"
    key_file.write_bytes(b"short\n")
    with pytest.raises(ConfigError, match=r"^policy.deceive_key_file: the key must be at least 16 bytes$"):
        PolicyConfig(deceive_key_file=str(key_file)).deceive_key()
    key_file.write_bytes(b"a-long-enough-key-from-a-file\n")
    assert PolicyConfig(deceive_key_file=str(key_file)).deceive_key() == b"a-long-enough-key-from-a-file"
