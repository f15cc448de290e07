"""The policy on the request path: decide, refuse or throttle, perturb or deceive, audit, count.

Two stages, because some verdicts only exist once the upstream has answered
(feature squeezing and the autoencoder score in the detect stage's
``on_response``; monitors that need the predicted class observe after the
response), while a block must happen before anything is forwarded::

    stages = [decode, RespondStage, detect, monitors, DecideStage]
    request:   decode → detect → monitors → DecideStage.on_request
    response:  monitors.on_response → detect.on_response → RespondStage.on_response

:class:`DecideStage` (``on_request``, after detect and monitors) reads the
policy in force once per call (kept for the whole call: a reload mid-call does
not change it), decides with the verdicts known so far, and refuses a
``block`` (PERMISSION_DENIED naming the rule) or a ``throttle`` beyond the
client's token bucket (RESOURCE_EXHAUSTED with a ``grpc-retry-pushback-ms``
trailer, or a delay; see :mod:`gateway.policy`) before anything goes upstream.

:class:`RespondStage` (``on_response``, after the detect stage has added its
response-time verdicts) decides again under the same policy with everything
known, and that is the call's decision: it is counted, written to the audit
log (unless a plain allow), and applied — ``block`` withholds the response,
``perturb``/``deceive`` rewrite the configured outputs
(:func:`detectors.perturb.perturb_response`), ``allow`` returns the upstream's
bytes untouched. A call the upstream fails is not decided again (nothing
leaves); a call refused at request time is counted and audited there.

Failure modes come from the policy (``failure.perturb``, ``failure.audit``):
``closed`` refuses the call — a response that cannot be perturbed is withheld
(INTERNAL), a decision that cannot be recorded is refused (UNAVAILABLE) —
``open`` serves it anyway. Both are counted.

Stats:

=====================================  =========  ==================================================
tfshield_decisions_total               counter    action, model (every decided call, allow included)
tfshield_shadow_decisions_total        counter    action, model (what shadow rules would have done)
tfshield_perturbations_total           counter    kind (top_k, rounding, label_only, reverse_sigmoid,
                                                  noise, deceive): responses rewritten, per kind
tfshield_perturb_failures_total        counter    mode (open: served unperturbed; closed: withheld)
tfshield_throttled_total               counter    outcome (delayed, rejected)
=====================================  =========  ==================================================

plus the audit log's (:mod:`gateway.audit`) and the policy holder's reload counter.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter

from detectors.perturb import Chain, PerturbError, deceiving, perturb_response, perturbing, row_keys
from gateway.audit import AuditLog, AuditUnavailable
from gateway.metrics import AfterResponse, BoundedLabel, LabelledChildren
from gateway.pipeline import Call, Refusal, Stage
from gateway.policy import DEFAULT_SIGNATURE, Decision, DetectionLike, MonitorResultLike, Policy, PolicyHolder

log = logging.getLogger(__name__)

# Methods that run a model; the metadata methods are never decided.
DECIDED_METHODS = frozenset({"Predict", "Classify", "Regress", "MultiInference"})
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
MAX_THROTTLED_CLIENTS = 100_000


class Throttled(Refusal):
    """A call beyond its client's token bucket; carries the retry hint as trailing metadata."""

    def __init__(self, rule: str, retry_after_s: float) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limited by rule '{rule}'; retry after {retry_after_s:.1f} s",
            rule=rule,
        )
        self.retry_after_s = retry_after_s
        self.trailing_metadata: tuple[tuple[str, str], ...] = (
            (RETRY_PUSHBACK_KEY, str(max(1, int(retry_after_s * 1000)))),
        )


class TokenBuckets:
    """Per-client token buckets in this process (at most ``max_clients``, least recently used dropped)."""

    def __init__(self, max_clients: int = MAX_THROTTLED_CLIENTS, clock: Callable[[], float] = time.monotonic):
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_clients
        self._clock = clock

    def take(self, client: str, rate_per_s: float, burst: int, reserve_within_s: float = 0.0) -> float:
        """0.0 when a token was taken now; else the seconds until one is due.

        With ``reserve_within_s`` > 0, a token due within that time is reserved
        (the caller waits the returned time and goes on); otherwise nothing is taken.
        """
        now = self._clock()
        tokens, last = self._buckets.pop(client, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate_per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate_per_s
            if wait <= reserve_within_s:
                tokens -= 1.0
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


class EnforceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "tfshield_decisions",
            "Decided calls by applied action and model.",
            ["action", "model"],
            registry=registry,
        )
        self.shadow_decisions = Counter(
            "tfshield_shadow_decisions",
            "Decisions of shadow rules (recorded, not applied) by action and model.",
            ["action", "model"],
            registry=registry,
        )
        self.perturbations = Counter(
            "tfshield_perturbations",
            "Responses rewritten, by perturbation kind.",
            ["kind"],
            registry=registry,
        )
        self.perturb_failures = Counter(
            "tfshield_perturb_failures",
            "Responses that could not be perturbed, by failure mode (open: served as is; closed: withheld).",
            ["mode"],
            registry=registry,
        )
        self.throttled = Counter(
            "tfshield_throttled",
            "Throttled calls by outcome (delayed, rejected).",
            ["outcome"],
            registry=registry,
        )
        for mode in ("open", "closed"):
            self.perturb_failures.labels(mode)
        for outcome in ("delayed", "rejected"):
            self.throttled.labels(outcome)
        # By (action, model label): bounded, as both label sets are.
        self.decisions_child = LabelledChildren(self.decisions)


@dataclass(slots=True)
class PolicyCallState:
    """What one call carries between the two stages (``call.policy_state``)."""

    policy: Policy
    signature: str
    throttled: bool = False  # a token was already taken for this call
    decision: Decision | None = None  # the final decision, once made
    keys: dict[int, np.ndarray] = field(default_factory=dict)


def _no_detections(call: Call) -> Sequence[DetectionLike]:
    return getattr(call.detect_state, "detections", ())


def _no_monitors(call: Call) -> Sequence[MonitorResultLike]:
    return ()


def _no_risk(call: Call) -> float:
    return 0.0


class Enforcer:
    """Everything both stages share: the policy holder, audit log, secrets, buckets and metrics."""

    def __init__(
        self,
        holder: PolicyHolder,
        registry: CollectorRegistry,
        *,
        audit: AuditLog | None = None,
        deceive_key: bytes | None = None,
        risk_of: Callable[[Call], float] = _no_risk,
        detections_of: Callable[[Call], Sequence[DetectionLike]] = _no_detections,
        monitors_of: Callable[[Call], Sequence[MonitorResultLike]] = _no_monitors,
        model_label: Callable[[str], str] | None = None,
        buckets: TokenBuckets | None = None,
        after: AfterResponse | None = None,
    ) -> None:
        self.holder = holder
        self.audit = audit
        if audit is None:
            log.info("audit.file is not set: decisions other than allow are counted, not written down")
        if deceive_key is None:
            log.warning(
                "no deceive key is configured (policy.deceive_key_env / deceive_key_file): deception and "
                "perturbation noise use a random per-process key, so replicas and restarts answer differently"
            )
            deceive_key = secrets.token_bytes(32)
        self._key = deceive_key
        self.risk_of = risk_of
        self.detections_of = detections_of
        self.monitors_of = monitors_of
        self.model_label = model_label or BoundedLabel(64)
        self.buckets = buckets or TokenBuckets()
        # Decisions are counted once the response is on its way. Registered before the
        # metrics it updates, so a scrape drains it first (metrics.AfterResponse).
        self.after = after if after is not None else AfterResponse(registry)
        self.metrics = EnforceMetrics(registry)
        self.decide_stage = DecideStage(self)
        self.respond_stage = RespondStage(self)

    # -- deciding --------------------------------------------------------------------------------

    def decide(self, call: Call, state: PolicyCallState) -> Decision:
        # A call nothing was found in is answered from the policy's own memo (Policy.decide).
        return state.policy.decide(
            call.model,
            state.signature,
            call.client_id,
            self.detections_of(call),
            self.risk_of(call),
            self.monitors_of(call),
        )

    async def settle(self, call: Call, state: PolicyCallState, decision: Decision) -> None:
        """Make ``decision`` the call's: count it and record it (closed audit failure: refuse)."""
        if self.count(call, state, decision):
            await self.record(call, state, decision)

    def count(self, call: Call, state: PolicyCallState, decision: Decision) -> bool:
        """The part of settling that needs no waiting; True if the decision must also be recorded."""
        state.decision = decision
        self.after.add(self._count, call.model, decision)
        return self.audit is not None and decision.recorded

    def _count(self, model: str, decision: Decision) -> None:
        model = self.model_label(model)
        self.metrics.decisions_child(decision.action, model).inc()
        for shadow in decision.shadowed:
            self.metrics.shadow_decisions.labels(shadow.action, model).inc()

    async def record(self, call: Call, state: PolicyCallState, decision: Decision) -> None:
        """Write ``decision`` to the audit log; refuse the call if it cannot be and the mode is closed."""
        assert self.audit is not None
        try:
            await self.audit.record(
                decision,
                client_id=call.client_id,
                model=call.model,
                signature=state.signature,
                method=call.method,
                request=call.raw,
                failure_mode=state.policy.failure.audit,
            )
        except AuditUnavailable as exc:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"the gateway cannot record this decision ({exc}); the call was refused",
                rule="audit_unavailable",
            ) from None

    async def throttle(self, call: Call, state: PolicyCallState, decision: Decision) -> None:
        """Take a token for the call, wait for one (delay mode), or raise Throttled."""
        if state.throttled:
            return
        spec = state.policy.throttle
        within = spec.max_delay_s if spec.mode == "delay" else 0.0
        if call.timeout_s is not None:
            within = min(within, max(0.0, call.timeout_s - 0.05))
        wait = self.buckets.take(call.client_id, spec.rate_per_s, spec.burst, within)
        if wait == 0.0:
            state.throttled = True
            return
        if wait <= within:
            self.metrics.throttled.labels("delayed").inc()
            state.throttled = True
            await asyncio.sleep(wait)
            return
        self.metrics.throttled.labels("rejected").inc()
        raise Throttled(decision.rule, wait)

    # -- responding -----------------------------------------------------------------------------

    def _keys_for(self, call: Call, state: PolicyCallState) -> Callable[[int], np.ndarray]:
        def keys_for(rows: int) -> np.ndarray:
            keys = state.keys.get(rows)
            if keys is None:
                keys = state.keys[rows] = row_keys(self._key, call.inputs, rows, fallback=call.raw)
            return keys

        return keys_for

    def rewrite(self, call: Call, state: PolicyCallState, decision: Decision, response: bytes) -> bytes:
        """Perturb or deceive the response as ``decision`` says, applying the perturb failure mode."""
        policy = state.policy
        try:
            if call.method != "Predict":
                raise PerturbError(f"{call.method} responses carry no tensors to perturb")
            selection = policy.outputs_for(call.model)
            names = selection.names or None
            kinds = selection.kinds if names else None
            keys_for = self._keys_for(call, state)
            if decision.action == "deceive":
                fn = deceiving(
                    self._key, policy.deceive_mode, kinds, selection.classes, keys_for, selection.label_names
                )
                kinds_applied: tuple[str, ...] = ("deceive",)
            else:
                steps = policy.perturb_levels[decision.level]
                chain = Chain(tuple((step.kind, step.params) for step in steps))
                fn = perturbing(chain, kinds, keys_for)
                kinds_applied = chain.kinds
            rewritten = perturb_response(response, names, fn)
            if rewritten is response and names is None:
                raise PerturbError(
                    f"model '{call.model}': no output holds probability rows; list its score outputs "
                    "under outputs in the policy"
                )
        except PerturbError as exc:
            mode = policy.failure.perturb
            self.metrics.perturb_failures.labels(mode).inc()
            log.warning("rule '%s': response not perturbed (%s mode): %s", decision.rule, mode, exc)
            if mode == "open":
                return response
            raise Refusal(
                grpc.StatusCode.INTERNAL,
                f"the response could not be prepared as rule '{decision.rule}' requires; it was withheld",
                rule=decision.rule,
            ) from None
        if rewritten is not response:
            for kind in kinds_applied:
                self.metrics.perturbations.labels(kind).inc()
        return rewritten


def _signature(call: Call) -> str:
    return call.signature or DEFAULT_SIGNATURE


def _refuse(decision: Decision) -> Refusal:
    return Refusal(
        grpc.StatusCode.PERMISSION_DENIED, f"request refused by rule '{decision.rule}'", rule=decision.rule
    )


class DecideStage(Stage):
    """Before forwarding: block and throttle with the verdicts known so far."""

    name = "decide"

    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer

    async def on_request(self, call: Call) -> None:
        if call.method not in DECIDED_METHODS:
            return
        enforcer = self.enforcer
        state = PolicyCallState(enforcer.holder.current, _signature(call))
        call.policy_state = state  # type: ignore[attr-defined]  # Call.policy_state (see the wiring notes)
        decision = enforcer.decide(call, state)
        if decision.action == "block":
            await enforcer.settle(call, state, decision)
            raise _refuse(decision)
        if decision.action == "throttle":
            try:
                await enforcer.throttle(call, state, decision)
            except Throttled:
                await enforcer.settle(call, state, decision)
                raise


class RespondStage(Stage):
    """After the response: the final decision with every verdict, recorded and applied."""

    name = "respond"

    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer

    async def on_response(self, call: Call, response: bytes) -> bytes:
        state = getattr(call, "policy_state", None)
        if not isinstance(state, PolicyCallState):
            return response
        enforcer = self.enforcer
        decision = enforcer.decide(call, state)
        if decision.action == "throttle":
            try:
                await enforcer.throttle(call, state, decision)
            except Throttled:
                await enforcer.settle(call, state, decision)
                raise
        if enforcer.count(call, state, decision):  # a plain allow needs no coroutine for its count
            await enforcer.record(call, state, decision)
        if decision.action == "block":
            raise _refuse(decision)
        if decision.action in ("perturb", "deceive"):
            return enforcer.rewrite(call, state, decision, response)
        return response
