"""The policy on the request path: what each decision does to a call, counted and audited."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectors.base import Detection
from gateway.audit import AuditConfig, AuditLog
from gateway.codec import numpy_to_tensor, tensor_to_numpy
from gateway.enforce import RETRY_PUSHBACK_KEY, Enforcer, Throttled
from gateway.pipeline import Call, Refusal
from gateway.policy import Policy, PolicyHolder
from protos import predict_pb2

KEY = b"enforce-test-deceive-key-0123456789"


class TestCall(Call):
    """A Call with room for ``policy_state`` (a field the server's Call gains when the stages are wired)."""

    __test__ = False


@dataclass
class Verdicts:
    """What the detect and monitor stages would have left on the call."""

    risk: float = 0.0
    detections: list[Detection] | None = None


def predict_call(x: np.ndarray, client: str = "peer:10.0.0.1", model: str = "mnist") -> TestCall:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(numpy_to_tensor(x, as_tensor_content=True))
    raw = request.SerializeToString()
    call = TestCall("Predict", raw, model, client_id=client)
    call.request = request
    call.inputs = {"x": x}
    return call


def response_for(probs: np.ndarray, content: bool = False) -> bytes:
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "mnist"
    response.outputs["probs"].CopyFrom(numpy_to_tensor(probs, as_tensor_content=content))
    return response.SerializeToString()


def probs_of(response: bytes) -> np.ndarray:
    message = predict_pb2.PredictResponse.FromString(response)
    return tensor_to_numpy(message.outputs["probs"], "probs", 2**30)


def digits(n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 8), dtype=np.float32), rng.dirichlet(np.full(10, 0.3), size=n).astype(np.float32)


class Harness:
    def __init__(
        self, policy: str = "", audit: AuditLog | None = None, registry: CollectorRegistry | None = None
    ):
        self.registry = registry or CollectorRegistry()
        self.holder = PolicyHolder(Policy.from_yaml(policy))
        self.verdicts: dict[str, Verdicts] = {}
        self.enforcer = Enforcer(
            self.holder,
            self.registry,
            audit=audit,
            deceive_key=KEY,
            risk_of=lambda call: self.verdicts.get(call.client_id, Verdicts()).risk,
            detections_of=lambda call: self.verdicts.get(call.client_id, Verdicts()).detections or (),
        )

    async def run(self, call: Call, response: bytes) -> bytes:
        """The request half, the upstream's ``response``, then the response half."""
        await self.enforcer.decide_stage.on_request(call)
        return await self.enforcer.respond_stage.on_response(call, response)

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def flagged(name: str) -> Detection:
    return Detection(name, np.array([3.0]), np.array([True]), 1.0)


# -- the four outcomes ----------------------------------------------------------------------------------


async def test_an_allowed_call_gets_the_upstream_bytes_untouched() -> None:
    harness = Harness()
    x, probs = digits()
    response = response_for(probs)
    assert await harness.run(predict_call(x), response) is response
    assert harness.count("tfshield_decisions_total", action="allow", model="mnist") == 1


async def test_a_blocked_call_is_refused_before_forwarding_naming_the_rule_not_the_scores() -> None:
    harness = Harness()
    harness.verdicts["peer:10.0.0.1"] = Verdicts(risk=0.97)
    with pytest.raises(Refusal) as refusal:
        await harness.enforcer.decide_stage.on_request(predict_call(digits()[0]))
    assert refusal.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refusal.value.message == "request refused by rule 'ladder.4'"
    assert harness.count("tfshield_decisions_total", action="block", model="mnist") == 1


async def test_a_risky_client_gets_perturbed_scores_with_the_same_labels() -> None:
    harness = Harness()
    harness.verdicts["peer:10.0.0.1"] = Verdicts(risk=0.65)  # level 2
    x, probs = digits()
    out = probs_of(await harness.run(predict_call(x), response_for(probs)))
    assert not np.array_equal(out, probs)
    np.testing.assert_array_equal(out.argmax(axis=1), probs.argmax(axis=1))
    for kind in ("reverse_sigmoid", "top_k", "rounding"):
        assert harness.count("tfshield_perturbations_total", kind=kind) == 1
    assert harness.count("tfshield_decisions_total", action="perturb", model="mnist") == 1


async def test_a_thief_is_deceived_consistently_and_a_benign_client_never_is() -> None:
    harness = Harness()
    harness.verdicts["key:thief"] = Verdicts(risk=0.9, detections=[flagged("prada")])
    x, probs = digits(16)
    first = probs_of(await harness.run(predict_call(x, "key:thief"), response_for(probs)))
    again = probs_of(await harness.run(predict_call(x, "key:thief"), response_for(probs)))
    np.testing.assert_array_equal(first, again)
    assert np.all(first.argmax(axis=1) != probs.argmax(axis=1))
    benign = probs_of(await harness.run(predict_call(x, "key:benign"), response_for(probs)))
    np.testing.assert_array_equal(benign, probs)
    assert harness.count("tfshield_perturbations_total", kind="deceive") == 2


async def test_a_verdict_that_arrives_with_the_response_can_still_block_it() -> None:
    harness = Harness("rules: [{name: squeezed, action: block, when: {flagged: [feature_squeezing]}}]")
    x, probs = digits()
    call = predict_call(x)
    await harness.enforcer.decide_stage.on_request(call)  # nothing flagged yet: forwarded
    harness.verdicts[call.client_id] = Verdicts(detections=[flagged("feature_squeezing")])
    with pytest.raises(Refusal) as refusal:
        await harness.enforcer.respond_stage.on_response(call, response_for(probs))
    assert refusal.value.message == "request refused by rule 'squeezed'"
    assert harness.count("tfshield_decisions_total", action="block", model="mnist") == 1
    assert harness.count("tfshield_decisions_total", action="allow", model="mnist") == 0


async def test_a_risk_that_rises_while_the_call_is_upstream_is_decided_again() -> None:
    # Nothing flagged at either half, so the respond half may reuse the request half's decision
    # only while the risk is the same.
    harness = Harness()
    x, probs = digits()
    call = predict_call(x)
    await harness.enforcer.decide_stage.on_request(call)
    harness.verdicts[call.client_id] = Verdicts(risk=0.97)
    with pytest.raises(Refusal) as refusal:
        await harness.enforcer.respond_stage.on_response(call, response_for(probs))
    assert refusal.value.message == "request refused by rule 'ladder.4'"
    assert harness.count("tfshield_decisions_total", action="block", model="mnist") == 1


# -- throttle --------------------------------------------------------------------------------------------


async def test_throttle_rejects_beyond_the_bucket_with_a_retry_hint() -> None:
    harness = Harness("throttle: {rate_per_s: 0.5, burst: 2}")
    harness.verdicts["key:t"] = Verdicts(risk=0.85)
    x, probs = digits()
    for _ in range(2):
        await harness.run(predict_call(x, "key:t"), response_for(probs))
    with pytest.raises(Throttled) as throttled:
        await harness.run(predict_call(x, "key:t"), response_for(probs))
    assert throttled.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert throttled.value.message == "rate limited by rule 'ladder.3'; retry after 2.0 s"
    ((key, value),) = throttled.value.trailing_metadata
    assert key == RETRY_PUSHBACK_KEY and 1900 <= int(value) <= 2000
    assert harness.count("tfshield_throttled_total", outcome="rejected") == 1
    assert harness.count("tfshield_decisions_total", action="throttle", model="mnist") == 3
    # Another client has its own bucket.
    harness.verdicts["key:u"] = Verdicts(risk=0.85)
    await harness.run(predict_call(x, "key:u"), response_for(probs))


async def test_throttle_in_delay_mode_holds_the_call_until_its_token() -> None:
    harness = Harness("throttle: {rate_per_s: 20, burst: 1, mode: delay, max_delay_s: 0.5}")
    harness.verdicts["key:t"] = Verdicts(risk=0.85)
    x, probs = digits()
    await harness.run(predict_call(x, "key:t"), response_for(probs))
    started = time.perf_counter()
    await harness.run(predict_call(x, "key:t"), response_for(probs))
    assert time.perf_counter() - started >= 0.04
    assert harness.count("tfshield_throttled_total", outcome="delayed") == 1


# -- shadow, reload, methods --------------------------------------------------------------------------------


async def test_shadow_decisions_are_counted_and_audited_but_not_applied(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(file=str(tmp_path / "audit.jsonl")), registry, b"salt")
    harness = Harness("rules: [{name: would-block, action: block, shadow: true}]", audit, registry)
    x, probs = digits()
    response = response_for(probs)
    try:
        assert await harness.run(predict_call(x), response) is response
    finally:
        audit.close()
    assert harness.count("tfshield_shadow_decisions_total", action="block", model="mnist") == 1
    assert harness.count("tfshield_decisions_total", action="allow", model="mnist") == 1
    (line,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert (line["action"], line["rule"], line["shadow"]) == ("block", "would-block", True)


async def test_a_call_in_flight_during_a_reload_finishes_under_the_old_policy() -> None:
    harness = Harness()
    x, probs = digits()
    call = predict_call(x)
    await harness.enforcer.decide_stage.on_request(call)
    harness.holder.reload("rules: [{name: lockdown, action: block}]")
    response = response_for(probs)
    assert await harness.enforcer.respond_stage.on_response(call, response) is response
    with pytest.raises(Refusal, match="lockdown"):
        await harness.run(predict_call(x), response)


async def test_metadata_calls_are_not_decided() -> None:
    harness = Harness("rules: [{name: lockdown, action: block}]")
    call = TestCall("GetModelMetadata", b"", "mnist")
    await harness.enforcer.decide_stage.on_request(call)
    assert await harness.enforcer.respond_stage.on_response(call, b"metadata") == b"metadata"


# -- failure modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_response_that_cannot_be_perturbed_follows_the_perturb_failure_mode(mode: str) -> None:
    harness = Harness(f"failure: {{perturb: {mode}}}")
    harness.verdicts["peer:10.0.0.1"] = Verdicts(risk=0.4)
    call = TestCall("Classify", b"\x0a\x07\x0a\x05mnist", "mnist", client_id="peer:10.0.0.1")
    if mode == "open":
        assert await harness.run(call, b"classification") == b"classification"
    else:
        with pytest.raises(Refusal) as refusal:
            await harness.run(call, b"classification")
        assert refusal.value.code == grpc.StatusCode.INTERNAL
        assert (
            refusal.value.message
            == "the response could not be prepared as rule 'ladder.1' requires; it was withheld"
        )
    assert harness.count("tfshield_perturb_failures_total", mode=mode) == 1


async def test_a_model_with_only_logits_is_perturbed_as_logits() -> None:
    harness = Harness("failure: {perturb: closed}")
    harness.verdicts["peer:10.0.0.1"] = Verdicts(risk=0.4)
    x, _ = digits()
    logits = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    auto = probs_of(await harness.run(predict_call(x), response_for(logits, content=True)))
    assert not np.array_equal(auto, logits)
    np.testing.assert_array_equal(auto.argmax(axis=1), logits.argmax(axis=1))
    configured = Harness("outputs: {mnist: [{name: probs, kind: logits}]}")
    configured.verdicts["peer:10.0.0.1"] = Verdicts(risk=0.4)
    out = probs_of(await configured.run(predict_call(x), response_for(logits, content=True)))
    np.testing.assert_array_equal(out.argmax(axis=1), logits.argmax(axis=1))


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_an_unwritable_audit_log_follows_the_audit_failure_mode(mode: str) -> None:
    registry = CollectorRegistry()
    audit = AuditLog(AuditConfig(file="/dev/full"), registry, b"salt")
    harness = Harness(f"failure: {{audit: {mode}}}", audit, registry)
    harness.verdicts["peer:10.0.0.1"] = Verdicts(risk=0.4)
    x, probs = digits()
    try:
        if mode == "open":
            out = probs_of(await harness.run(predict_call(x), response_for(probs)))
            np.testing.assert_array_equal(out.argmax(axis=1), probs.argmax(axis=1))
        else:
            with pytest.raises(Refusal) as refusal:
                await harness.run(predict_call(x), response_for(probs))
            assert refusal.value.code == grpc.StatusCode.UNAVAILABLE
            assert refusal.value.rule == "audit_unavailable"
    finally:
        audit.close()
    assert harness.count("tfshield_audit_write_errors_total", reason="no_space") == 1
