"""The policy: what the gateway does with a call, given detector verdicts and client risk.

One YAML file, read with ``yaml.safe_load`` once per load and turned into
frozen, precompiled objects; a per-request decision never looks at raw YAML.
Errors name the key and the problem (``rules.2.when.risk_at_least: must be
between 0 and 1``), and a bad file never replaces a good policy
(:class:`PolicyHolder`).

Actions, mildest first:

``allow``
    forward; answer unchanged.
``perturb`` (with a ``level``)
    forward; the configured probability/logit outputs are perturbed before they
    leave (:mod:`detectors.perturb`): every level keeps each sample's top-1
    class, so an honest client's label is never wrong.
``deceive``
    forward; the outputs are replaced by keyed, consistent, misleading ones
    (:func:`detectors.perturb.deceive`). Exists because a visible refusal is an
    oracle for adaptive attacks on stateful defences (OARS, Feng et al., CCS
    2023) and a label-only thief is not hurt by argmax-preserving noise.
``throttle``
    a per-client token bucket (``throttle.rate_per_s``, ``throttle.burst``):
    calls within it are forwarded (as ``allow``); a call beyond it is refused
    with RESOURCE_EXHAUSTED and a retry hint (``mode: reject``, the default),
    or held until a token is due when that is at most ``max_delay_s`` away
    (``mode: delay``). Reject is the default because holding calls costs the
    gateway a slot per held call, which an attacker can multiply.
``block``
    refused with PERMISSION_DENIED naming the rule, never the scores.

Any rule, and the ladder, can be ``shadow: true``: its decision is recorded
(metrics, audit log) but not applied, and evaluation goes on as if the rule
were absent, so a new rule can be tried next to the ones it would replace.

How a call is decided (:meth:`Policy.decide`):

1. The client's group: ``client_groups`` map client-id patterns to names.
   Exact ids win over prefixes, the longest prefix wins over shorter ones, and
   prefixes win over globs (tried in the order written). A client in no group
   is in group ``default``.
2. ``rules``, in order: the first non-shadow rule whose ``match`` (models,
   signatures, groups; an empty list matches anything) and ``when`` (any of
   the ``flagged`` detectors/monitors flagged this call — ``"*"`` means any —,
   ``risk_at_least``, ``risk_below``; all that are given must hold) both hold
   decides.
3. Otherwise the escalation ``ladder`` by client risk. Its default:

   ==================  ====================================================
   client risk         action
   ==================  ====================================================
   [0, 0.3)            allow
   [0.3, 0.6)          perturb, level 1 (keyed noise + 2 decimals)
   [0.6, 0.8)          perturb, level 2 (reverse sigmoid + top-3 + 2 decimals)
   [0.8, 0.95)         throttle
   [0.95, 1]           block
   ==================  ====================================================

   and ``ladder.deceive``: a call flagged by any of ``deceive.flagged``
   (default: the extraction monitors, ``prada``, ``class_coverage`` and
   ``ood_rate``) with risk >= ``deceive.risk_at_least`` (default 0.6) is deceived instead of
   whatever its step says, block included: a thief who is refused learns that
   he was caught, one who is deceived keeps training on poison. Evasion-style
   high risk (``blacklight``, ``knn``) still throttles and blocks: deceiving a
   decision-based evasion attack would only feed it wrong boundaries it can
   cross-check, while refusals starve it of queries. ``ood_rate`` sees
   both kinds (a client whose queries keep leaving the benign data); it is in
   the deceive list because its extraction flags are the ones no other
   monitor raises, so an evasion attack it flags first is deceived too.

The signature of a call is ``model_spec.signature_name``, or ``serving_default``
when empty, as TF Serving resolves it.

``failure`` sets the failure mode per stage (``open``: serve and count;
``closed``: refuse and count): ``detect`` (a detector could not score),
``monitors`` (the state store failed), ``perturb`` (a response could not be
perturbed: no perturbable output, an undecodable tensor, a method whose
response has no tensors) and ``audit`` (the audit line could not be written).
All default to ``closed`` (DESIGN.md, decision 6).

:data:`DEFAULT_POLICY_YAML` is the built-in policy, and a commented example
of every key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import yaml
from prometheus_client import CollectorRegistry, Counter

from gateway.errors import ConfigError

log = logging.getLogger(__name__)

Action = Literal["allow", "perturb", "deceive", "throttle", "block"]
ACTIONS: tuple[str, ...] = ("allow", "perturb", "deceive", "throttle", "block")
FailureMode = Literal["open", "closed"]
PerturbKind = Literal["top_k", "rounding", "label_only", "reverse_sigmoid", "noise"]
DEFAULT_GROUP = "default"
DEFAULT_SIGNATURE = "serving_default"
ANY_DETECTOR = "*"
# Parameters each perturbation kind takes (the others must be absent).
PERTURB_PARAMS: dict[str, tuple[str, ...]] = {
    "top_k": ("k",),
    "rounding": ("decimals",),
    "label_only": (),
    "reverse_sigmoid": ("beta", "gamma"),
    "noise": ("sigma",),
}
_GROUP_CACHE_SIZE = 65536
# Decisions of calls with no detection and no monitor result, by (model, signature, group, risk).
_QUIET_CACHE_SIZE = 4096


class PolicyError(ConfigError):
    """A policy cannot be loaded; the message names the key and the problem."""


# -- the schema: what the YAML may say -------------------------------------------------


def _require(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise PolicyError(f"{path}: {problem}")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_probability(value: float | None, path: str) -> None:
    if value is not None:
        _require(0.0 <= value <= 1.0, path, "must be between 0 and 1")


@dataclass(frozen=True)
class ClientGroupSpec:
    """Client-id patterns of one group (ids as gateway/identity.py makes them)."""

    exact: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    # fnmatch patterns: * any run, ? one character, [...] a set.
    glob: tuple[str, ...] = ()

    def validate(self, path: str) -> None:
        _require(
            bool(self.exact or self.prefix or self.glob), path, "needs at least one of exact, prefix, glob"
        )
        for i, prefix in enumerate(self.prefix):
            _require(bool(prefix), f"{path}.prefix.{i}", "must not be empty (it would match every client)")


@dataclass(frozen=True)
class MatchSpec:
    """Which calls a rule applies to; an empty list matches anything."""

    models: tuple[str, ...] = ()
    signatures: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class WhenSpec:
    """Conditions on the call's verdicts; all that are given must hold."""

    # Detector or monitor names; holds when any of them flagged this call ("*": any).
    flagged: tuple[str, ...] = ()
    risk_at_least: float | None = None
    risk_below: float | None = None

    def validate(self, path: str) -> None:
        _check_probability(self.risk_at_least, _at(path, "risk_at_least"))
        _check_probability(self.risk_below, _at(path, "risk_below"))
        if self.risk_at_least is not None and self.risk_below is not None:
            _require(self.risk_below > self.risk_at_least, _at(path, "risk_below"), "must be > risk_at_least")


def _check_level(action: str, level: int | None, path: str) -> None:
    if action == "perturb":
        _require(level is not None, _at(path, "level"), "perturb needs a level")
    else:
        _require(level is None, _at(path, "level"), f"only perturb takes a level, not {action}")


@dataclass(frozen=True)
class RuleSpec:
    name: str
    action: Action
    match: MatchSpec = field(default_factory=MatchSpec)
    when: WhenSpec = field(default_factory=WhenSpec)
    # perturb only: a key of perturb_levels.
    level: int | None = None
    shadow: bool = False

    def validate(self, path: str) -> None:
        _require(bool(self.name.strip()), _at(path, "name"), "must not be empty")
        _check_level(self.action, self.level, path)


@dataclass(frozen=True)
class LadderStep:
    # The step applies from this risk up to the next step's.
    risk_at_least: float
    action: Action
    level: int | None = None

    def validate(self, path: str) -> None:
        _check_probability(self.risk_at_least, _at(path, "risk_at_least"))
        _check_level(self.action, self.level, path)


@dataclass(frozen=True)
class LadderDeceiveSpec:
    """Deceive, instead of the step's action, calls flagged by these at this risk or more."""

    # The extraction monitors (detectors/: PRADA, class coverage, off-distribution rate).
    flagged: tuple[str, ...] = ("prada", "class_coverage", "ood_rate")
    risk_at_least: float = 0.6

    def validate(self, path: str) -> None:
        _require(bool(self.flagged), _at(path, "flagged"), "must name at least one detector or monitor")
        _check_probability(self.risk_at_least, _at(path, "risk_at_least"))


DEFAULT_LADDER: tuple[LadderStep, ...] = (
    LadderStep(0.0, "allow"),
    LadderStep(0.3, "perturb", 1),
    LadderStep(0.6, "perturb", 2),
    LadderStep(0.8, "throttle"),
    LadderStep(0.95, "block"),
)


@dataclass(frozen=True)
class LadderSpec:
    steps: tuple[LadderStep, ...] = DEFAULT_LADDER
    deceive: LadderDeceiveSpec | None = field(default_factory=LadderDeceiveSpec)
    shadow: bool = False

    def validate(self, path: str) -> None:
        _require(bool(self.steps), _at(path, "steps"), "needs at least one step")
        _require(self.steps[0].risk_at_least == 0.0, _at(path, "steps.0.risk_at_least"), "must be 0")
        for i in range(1, len(self.steps)):
            _require(
                self.steps[i].risk_at_least > self.steps[i - 1].risk_at_least,
                _at(path, f"steps.{i}.risk_at_least"),
                "must be greater than the previous step's",
            )


@dataclass(frozen=True)
class PerturbStepSpec:
    """One perturbation of a level's chain; see detectors/perturb.py for each kind."""

    kind: PerturbKind
    k: int | None = None  # top_k: classes kept
    decimals: int | None = None  # rounding
    beta: float | None = None  # reverse_sigmoid: strength, (0, 1]
    gamma: float | None = None  # reverse_sigmoid: slope, > 0
    sigma: float | None = None  # noise: std of the log-probability noise

    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PERTURB_PARAMS[self.kind]}

    def validate(self, path: str) -> None:
        takes = PERTURB_PARAMS[self.kind]
        for name in ("k", "decimals", "beta", "gamma", "sigma"):
            value = getattr(self, name)
            if name in takes:
                _require(value is not None, _at(path, name), f"{self.kind} needs {name}")
            else:
                _require(value is None, _at(path, name), f"not a parameter of {self.kind}")
        if self.k is not None:
            _require(self.k >= 1, _at(path, "k"), "must be >= 1")
        if self.decimals is not None:
            _require(0 <= self.decimals <= 6, _at(path, "decimals"), "must be between 0 and 6")
        if self.beta is not None:
            _require(0 < self.beta <= 1, _at(path, "beta"), "must be in (0, 1]")
        if self.gamma is not None:
            _require(0 < self.gamma <= 10, _at(path, "gamma"), "must be in (0, 10]")
        if self.sigma is not None:
            _require(0 < self.sigma <= 5, _at(path, "sigma"), "must be in (0, 5]")


DEFAULT_PERTURB_LEVELS: dict[int, tuple[PerturbStepSpec, ...]] = {
    1: (PerturbStepSpec("noise", sigma=0.1), PerturbStepSpec("rounding", decimals=2)),
    2: (
        PerturbStepSpec("reverse_sigmoid", beta=0.6, gamma=0.4),
        PerturbStepSpec("top_k", k=3),
        PerturbStepSpec("rounding", decimals=2),
    ),
    3: (PerturbStepSpec("label_only"),),
}


@dataclass(frozen=True)
class OutputSpec:
    """A response output that carries scores, and what they are."""

    name: str
    # probabilities / logits: (..., classes) floats; labels: the top-1 class as an
    # integer id or a string name, rewritten by deceive only (every perturbation
    # keeps the top-1 class anyway). An unlisted label output would give a
    # deceived client the true class.
    kind: Literal["probabilities", "logits", "labels"] = "probabilities"
    # labels: the number of classes (integer ids), or the class names in class order (strings).
    classes: int | None = None
    names: tuple[str, ...] = ()

    def validate(self, path: str) -> None:
        if self.kind == "labels":
            count = self.classes if self.classes is not None else len(self.names)
            _require(count >= 2, _at(path, "classes"), "labels outputs need classes >= 2 or names")
            if self.names and self.classes is not None:
                _require(self.classes == len(self.names), _at(path, "names"), "must have `classes` names")
            _require(len(set(self.names)) == len(self.names), _at(path, "names"), "names a class twice")
        else:
            for key in ("classes", "names"):
                _require(
                    not getattr(self, key),
                    _at(path, key),
                    f"only labels outputs take {key}, not {self.kind}",
                )


@dataclass(frozen=True)
class DeceiveSpec:
    # permutation: a keyed derangement of the classes, the same for every input
    # (a copycat learns a consistently wrong function); misinformation: per input,
    # a keyed wrong class takes the top probability (Adaptive Misinformation-style).
    mode: Literal["permutation", "misinformation"] = "permutation"


@dataclass(frozen=True)
class ThrottleSpec:
    # Token bucket per client, per gateway replica.
    rate_per_s: float = 1.0
    burst: int = 5
    mode: Literal["reject", "delay"] = "reject"
    # delay mode: hold a call at most this long for its token, else reject it.
    max_delay_s: float = 1.0

    def validate(self, path: str) -> None:
        _require(self.rate_per_s > 0, _at(path, "rate_per_s"), "must be > 0")
        _require(self.burst >= 1, _at(path, "burst"), "must be >= 1")
        _require(0 <= self.max_delay_s <= 60, _at(path, "max_delay_s"), "must be between 0 and 60")


@dataclass(frozen=True)
class FailureSpec:
    detect: FailureMode = "closed"
    monitors: FailureMode = "closed"
    perturb: FailureMode = "closed"
    audit: FailureMode = "closed"


@dataclass(frozen=True)
class PolicySpec:
    """The policy file's schema (plain, validated data; :class:`Policy` compiles it)."""

    version: Literal[1] = 1
    client_groups: dict[str, ClientGroupSpec] = field(default_factory=dict)
    # Model name -> its score outputs; "*" for models not named. A model with none
    # configured gets every output that holds probability rows (auto-detected).
    outputs: dict[str, tuple[OutputSpec, ...]] = field(default_factory=dict)
    rules: tuple[RuleSpec, ...] = ()
    ladder: LadderSpec = field(default_factory=LadderSpec)
    perturb_levels: dict[int, tuple[PerturbStepSpec, ...]] = field(
        default_factory=lambda: dict(DEFAULT_PERTURB_LEVELS)
    )
    deceive: DeceiveSpec = field(default_factory=DeceiveSpec)
    throttle: ThrottleSpec = field(default_factory=ThrottleSpec)
    failure: FailureSpec = field(default_factory=FailureSpec)

    def validate(self, path: str) -> None:
        for name in self.client_groups:
            _require(name != DEFAULT_GROUP, f"client_groups.{name}", "is reserved for clients in no group")
        groups = sorted([*self.client_groups, DEFAULT_GROUP])
        for level, chain in self.perturb_levels.items():
            _require(level >= 1, f"perturb_levels.{level}", "levels are numbered from 1")
            _require(bool(chain), f"perturb_levels.{level}", "needs at least one perturbation")
        levels = sorted(self.perturb_levels)

        def check_level(level: int | None, where: str) -> None:
            if level is not None:
                _require(
                    level in self.perturb_levels,
                    where,
                    f"perturb level {level} is not defined; defined: {', '.join(map(str, levels))}",
                )

        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            where = f"rules.{i}"
            _require(
                rule.name not in seen,
                f"{where}.name",
                f"'{rule.name}' is already the name of rules.{seen.get(rule.name)}",
            )
            seen[rule.name] = i
            for j, group in enumerate(rule.match.groups):
                _require(
                    group in groups,
                    f"{where}.match.groups.{j}",
                    f"unknown client group '{group}'; defined: {', '.join(groups)}",
                )
            check_level(rule.level, f"{where}.level")
        for i, step in enumerate(self.ladder.steps):
            check_level(step.level, f"ladder.steps.{i}.level")
        for model, outputs in self.outputs.items():
            _require(bool(outputs), f"outputs.{model}", "needs at least one output")
            names = [o.name for o in outputs]
            _require(len(set(names)) == len(names), f"outputs.{model}", "names an output twice")


# -- the compiled policy ------------------------------------------------------------------


class DetectionLike(Protocol):
    """detectors.base.Detection: one detector's verdict on this call's samples."""

    detector: str
    scores: Any  # ndarray (n,)
    flagged: Any  # ndarray (n,) bool
    threshold: float


class MonitorResultLike(Protocol):
    """detectors.monitor.MonitorResult: one monitor's verdict on this client."""

    monitor: str
    score: float
    flagged: bool
    risk: float


EMPTY_SCORES: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one call, and why.

    ``action``/``level`` are what is applied. ``rule`` names what decided: a
    rule's name, ``ladder.<i>`` (a ladder step), ``ladder.deceive``, or
    ``ladder.shadow`` (allow because the ladder is in shadow mode). ``shadow``
    is True only for the record-only decisions in ``shadowed`` (shadow rules
    that matched before the applied one, and a shadow ladder). ``scores`` are
    what the decision was based on, for the audit log: ``risk``, each
    detector's highest score in units of its threshold (1.0 = flag line) and
    each monitor's risk (``monitor:<name>``); empty for a plain allow.
    """

    action: str
    level: int
    rule: str
    shadow: bool = False
    scores: Mapping[str, float] = field(default_factory=lambda: EMPTY_SCORES)
    group: str = DEFAULT_GROUP
    shadowed: tuple[Decision, ...] = ()

    @property
    def recorded(self) -> bool:
        """Whether this call's decision goes to the audit log (anything but a plain allow)."""
        return self.action != "allow" or bool(self.shadowed)


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    action: str
    level: int
    shadow: bool
    models: frozenset[str] | None
    signatures: frozenset[str] | None
    groups: frozenset[str] | None
    flagged: frozenset[str] | None  # None: no condition
    flagged_any: bool
    risk_at_least: float
    risk_below: float


@dataclass(frozen=True, slots=True)
class PerturbStep:
    kind: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class OutputSelection:
    names: tuple[str, ...]
    kinds: Mapping[str, str]  # name -> probabilities | logits | labels
    classes: Mapping[str, int]  # labels outputs: name -> number of classes
    label_names: Mapping[str, tuple[str, ...]]  # string labels outputs: name -> class names


AUTO_OUTPUTS = OutputSelection((), MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))


def _frozen(values: tuple[str, ...]) -> frozenset[str] | None:
    return frozenset(values) if values else None


class Policy:
    """A loaded, validated, precompiled policy. Immutable; share it freely."""

    def __init__(
        self, spec: PolicySpec, text: str, source: str = "", loaded_unix_s: float | None = None
    ) -> None:
        self.spec = spec
        self.text = text
        self.source = source
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        self.loaded_unix_s = time.time() if loaded_unix_s is None else loaded_unix_s
        self.failure = spec.failure
        self.throttle = spec.throttle
        self.deceive_mode = spec.deceive.mode

        exact: dict[str, str] = {}
        prefixes: list[tuple[str, str]] = []
        globs: list[tuple[re.Pattern[str], str]] = []
        for name, group in spec.client_groups.items():
            for client in group.exact:
                exact.setdefault(client, name)
            prefixes += [(p, name) for p in group.prefix]
            globs += [(re.compile(fnmatch.translate(g)), name) for g in group.glob]
        prefixes.sort(key=lambda item: -len(item[0]))  # stable: ties keep file order
        self._exact = exact
        self._prefixes = tuple(prefixes)
        self._globs = tuple(globs)
        self._group_cache: dict[str, str] = {}
        self._quiet_cache: dict[tuple[str, str, str, float], Decision] = {}

        self._rules = tuple(
            _Rule(
                name=r.name,
                action=r.action,
                level=r.level or 0,
                shadow=r.shadow,
                models=_frozen(r.match.models),
                signatures=_frozen(r.match.signatures),
                groups=_frozen(r.match.groups),
                flagged=frozenset(n for n in r.when.flagged if n != ANY_DETECTOR) if r.when.flagged else None,
                flagged_any=ANY_DETECTOR in r.when.flagged,
                risk_at_least=-math.inf if r.when.risk_at_least is None else r.when.risk_at_least,
                risk_below=math.inf if r.when.risk_below is None else r.when.risk_below,
            )
            for r in spec.rules
        )
        ladder = spec.ladder
        self._ladder_floors = tuple(step.risk_at_least for step in ladder.steps)
        self._ladder_steps = tuple(
            (s.action, s.level or 0, f"ladder.{i}") for i, s in enumerate(ladder.steps)
        )
        self._ladder_shadow = ladder.shadow
        deceive = ladder.deceive
        self._deceive_flagged = (
            frozenset(n for n in deceive.flagged if n != ANY_DETECTOR) if deceive else frozenset()
        )
        self._deceive_any = bool(deceive) and ANY_DETECTOR in deceive.flagged  # type: ignore[union-attr]
        self._deceive_risk = deceive.risk_at_least if deceive else math.inf

        self.perturb_levels: Mapping[int, tuple[PerturbStep, ...]] = MappingProxyType(
            {
                level: tuple(PerturbStep(s.kind, MappingProxyType(s.params())) for s in chain)
                for level, chain in spec.perturb_levels.items()
            }
        )
        self._outputs = {
            model: OutputSelection(
                tuple(o.name for o in outs),
                MappingProxyType({o.name: o.kind for o in outs}),
                MappingProxyType({o.name: o.classes or len(o.names) for o in outs if o.kind == "labels"}),
                MappingProxyType({o.name: o.names for o in outs if o.names}),
            )
            for model, outs in spec.outputs.items()
        }

    # -- loading -------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, text: str, source: str = "<text>") -> Policy:
        """Parse and validate policy YAML; raises PolicyError naming the key."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"not valid YAML: {_yaml_problem(exc)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PolicyError(f"policy: must be a mapping, not {type(data).__name__}")
        # Imported here: gateway.config imports this module's PolicyConfig.
        from gateway.config import _build

        try:
            spec = _build(PolicySpec, data, "")
        except PolicyError:
            raise
        except ConfigError as exc:
            raise PolicyError(str(exc)) from None
        return cls(spec, text, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Read a policy file; errors start with the file name."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise PolicyError(f"{path}: not UTF-8 text") from None
        try:
            return cls.from_yaml(text, str(path))
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    @classmethod
    def default(cls) -> Policy:
        return cls.from_yaml(DEFAULT_POLICY_YAML, "<built-in default>")

    # -- lookups -------------------------------------------------------------------

    @property
    def detector_names(self) -> frozenset[str]:
        """Every detector/monitor name the policy refers to (to check against the known ones)."""
        names: set[str] = set(self._deceive_flagged)
        for rule in self._rules:
            names |= rule.flagged or frozenset()
        return frozenset(names)

    def group_of(self, client_id: str) -> str:
        cached = self._group_cache.get(client_id)
        if cached is not None:
            return cached
        group = self._exact.get(client_id)
        if group is None:
            for prefix, name in self._prefixes:
                if client_id.startswith(prefix):
                    group = name
                    break
            else:
                for pattern, name in self._globs:
                    if pattern.match(client_id):
                        group = name
                        break
                else:
                    group = DEFAULT_GROUP
        cache = self._group_cache
        if len(cache) >= _GROUP_CACHE_SIZE:
            cache.clear()  # bounded: client ids are unbounded
        cache[client_id] = group
        return group

    def outputs_for(self, model: str) -> OutputSelection:
        """The score outputs of ``model``; AUTO_OUTPUTS (empty names) means auto-detect."""
        selection = self._outputs.get(model)
        if selection is None:
            selection = self._outputs.get("*", AUTO_OUTPUTS)
        return selection

    # -- the decision --------------------------------------------------------------

    def decide(
        self,
        model: str,
        signature: str,
        client_id: str,
        detections: Sequence[DetectionLike],
        risk: float,
        monitors: Sequence[MonitorResultLike] = (),
    ) -> Decision:
        """Decide one call. Pure: the same arguments give the same Decision.

        Being pure, a call nothing was found in (most calls) is decided once per
        (model, signature, client group, risk) and remembered, in a bounded cache.
        """
        group = self.group_of(client_id)
        signature = signature or DEFAULT_SIGNATURE
        if detections or monitors:
            return self._decide(model, signature, group, detections, risk, monitors)
        key = (model, signature, group, risk)
        decision = self._quiet_cache.get(key)
        if decision is None:
            decision = self._decide(model, signature, group, (), risk, ())
            if len(self._quiet_cache) >= _QUIET_CACHE_SIZE:
                self._quiet_cache.clear()  # bounded: model names and risks come from clients
            self._quiet_cache[key] = decision
        return decision

    def _decide(
        self,
        model: str,
        signature: str,
        group: str,
        detections: Sequence[DetectionLike],
        risk: float,
        monitors: Sequence[MonitorResultLike],
    ) -> Decision:
        flagged: frozenset[str] | None = None
        shadowed: list[Decision] | None = None
        for rule in self._rules:
            if rule.models is not None and model not in rule.models:
                continue
            if rule.signatures is not None and signature not in rule.signatures:
                continue
            if rule.groups is not None and group not in rule.groups:
                continue
            if not rule.risk_at_least <= risk < rule.risk_below:
                continue
            if rule.flagged is not None:
                if flagged is None:
                    flagged = _flagged_names(detections, monitors)
                if not (flagged and rule.flagged_any) and rule.flagged.isdisjoint(flagged):
                    continue
            if rule.shadow:
                shadowed = shadowed or []
                shadowed.append(
                    Decision(
                        rule.action, rule.level, rule.name, True, _scores(detections, monitors, risk), group
                    )
                )
                continue
            return self._final(
                rule.action, rule.level, rule.name, group, detections, monitors, risk, shadowed
            )

        i = _step_index(self._ladder_floors, risk)
        action, level, name = self._ladder_steps[i]
        if action != "allow" and risk >= self._deceive_risk:
            if flagged is None:
                flagged = _flagged_names(detections, monitors)
            if flagged and (self._deceive_any or not self._deceive_flagged.isdisjoint(flagged)):
                action, level, name = "deceive", 0, "ladder.deceive"
        if self._ladder_shadow:
            if action == "allow":
                return self._final("allow", 0, name, group, detections, monitors, risk, shadowed)
            shadowed = shadowed or []
            shadowed.append(Decision(action, level, name, True, _scores(detections, monitors, risk), group))
            return self._final("allow", 0, "ladder.shadow", group, detections, monitors, risk, shadowed)
        return self._final(action, level, name, group, detections, monitors, risk, shadowed)

    @staticmethod
    def _final(
        action: str,
        level: int,
        rule: str,
        group: str,
        detections: Sequence[DetectionLike],
        monitors: Sequence[MonitorResultLike],
        risk: float,
        shadowed: list[Decision] | None,
    ) -> Decision:
        if action == "allow" and not shadowed:
            return Decision(action, level, rule, False, EMPTY_SCORES, group)
        return Decision(
            action, level, rule, False, _scores(detections, monitors, risk), group, tuple(shadowed or ())
        )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own text spans several lines and quotes the source)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _step_index(floors: tuple[float, ...], risk: float) -> int:
    # A handful of steps: a linear scan beats bisect's call overhead.
    index = 0
    for i, floor in enumerate(floors):
        if risk >= floor:
            index = i
        else:
            break
    return index


def _flagged_names(
    detections: Sequence[DetectionLike], monitors: Sequence[MonitorResultLike]
) -> frozenset[str]:
    names = [d.detector for d in detections if d.flagged.any()]
    names += [m.monitor for m in monitors if m.flagged]
    return frozenset(names)


def _scores(
    detections: Sequence[DetectionLike], monitors: Sequence[MonitorResultLike], risk: float
) -> Mapping[str, float]:
    scores: dict[str, float] = {"risk": float(risk)}
    for d in detections:
        if len(d.scores):
            top = float(d.scores.max())
            scores[d.detector] = top / d.threshold if d.threshold > 0 else top
    for m in monitors:
        scores[f"monitor:{m.monitor}"] = float(m.risk)
    return MappingProxyType(scores)


# -- the policy in force, and reloading it ---------------------------------------------------


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "tfshield_policy_reloads",
            "Policy reloads by outcome (ok; invalid: refused, the old policy stays).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("ok", "invalid"):
            self.reloads.labels(outcome)


class PolicyHolder:
    """The policy in force, swapped atomically on reload.

    A call reads :attr:`current` once and keeps that object (and the Decision
    it made) until it ends, so calls in flight during a reload finish under the
    policy they started with. A reload builds and validates the new policy
    completely before the swap, a single reference assignment; a bad policy is
    refused with :class:`PolicyError` and the old one stays.

    Stats: ``tfshield_policy_reloads_total{outcome}`` (ok, invalid).
    """

    def __init__(
        self, policy: Policy, path: str | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.current = policy
        self.path = path
        self.metrics = PolicyMetrics(registry if registry is not None else CollectorRegistry())
        self._lock = threading.Lock()  # reloads one at a time (SIGHUP and the control API)

    @classmethod
    def load(cls, path: str | None, registry: CollectorRegistry | None = None) -> PolicyHolder:
        """The policy from ``path``, or the built-in default when None (start-up: errors propagate)."""
        policy = Policy.from_file(path) if path else Policy.default()
        return cls(policy, path, registry)

    def reload(self, text: str | None = None) -> Policy:
        """Replace the policy by ``text``, or by the file's content when None."""
        with self._lock:
            try:
                if text is not None:
                    policy = Policy.from_yaml(text, "<control API>")
                elif self.path:
                    policy = Policy.from_file(self.path)
                else:
                    raise PolicyError(
                        "no policy file is configured (policy.file); send the policy text instead"
                    )
            except PolicyError as exc:
                self.metrics.reloads.labels("invalid").inc()
                log.warning("policy reload refused, the old policy stays: %s", exc)
                raise
            self.current = policy
        self.metrics.reloads.labels("ok").inc()
        log.info("policy reloaded from %s (sha256 %s)", policy.source, policy.sha256[:12])
        return policy


# -- the gateway config section --------------------------------------------------------------


@dataclass(frozen=True)
class PolicyConfig:
    """Where the policy and its secrets come from (``policy:`` in the gateway config)."""

    # The policy YAML file; None runs the built-in default (DEFAULT_POLICY_YAML).
    file: str | None = None
    # The deceive key (any length >= 16 bytes): from this environment variable, or
    # from key_file. It keys deception and perturbation noise; replicas must share it.
    deceive_key_env: str = "TFSHIELD_DECEIVE_KEY"
    deceive_key_file: str | None = None

    def deceive_key(self) -> bytes | None:
        """The configured key, or None when neither source has one (callers warn and pick a random one)."""
        import os

        if self.deceive_key_file:
            try:
                key = Path(self.deceive_key_file).read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"policy.deceive_key_file: cannot read: {exc.strerror}") from None
            if len(key) < 16:
                raise ConfigError("policy.deceive_key_file: the key must be at least 16 bytes")
            return key
        value = os.environ.get(self.deceive_key_env, "").encode()
        if value and len(value) < 16:
            raise ConfigError(f"policy.deceive_key_env: {self.deceive_key_env} must hold at least 16 bytes")
        return value or None


DEFAULT_POLICY_YAML = """\
# tfshield policy: the built-in default, and an example of every key.
version: 1

# Client groups by client id (gateway/identity.py: mtls:<name>, key:<hash>, peer:<ip>).
# Exact ids win, then the longest prefix, then globs in order; else group "default".
client_groups: {}
#  partners:
#    exact: ["mtls:partner-a"]
#    prefix: ["mtls:partner-"]
#    glob: ["mtls:spiffe://prod/ns/*/sa/scorer"]

# Outputs that carry scores, per model ("*": any other model). Unlisted models:
# every output whose rows are probability vectors is perturbed.
outputs: {}
#  mnist:
#    - {name: probabilities, kind: probabilities}
#    - {name: logits, kind: logits}
#    - {name: class_ids, kind: labels, classes: 10}
#    - {name: class_names, kind: labels, names: [zero, one, two, three, four, five, six, seven, eight, nine]}

# First matching non-shadow rule decides; no match: the ladder.
rules: []
#  - name: partners-never-perturbed
#    match: {groups: [partners]}
#    action: allow
#  - name: squeezing-flags-block
#    match: {models: [mnist], signatures: [serving_default]}
#    when: {flagged: [feature_squeezing], risk_at_least: 0.5}
#    action: block
#    shadow: true

ladder:
  steps:
    - {risk_at_least: 0.0, action: allow}
    - {risk_at_least: 0.3, action: perturb, level: 1}
    - {risk_at_least: 0.6, action: perturb, level: 2}
    - {risk_at_least: 0.8, action: throttle}
    - {risk_at_least: 0.95, action: block}
  # Flagged by these and at least this risk: deceive instead (null disables).
  deceive: {flagged: [prada, class_coverage, ood_rate], risk_at_least: 0.6}
  shadow: false

# Each level is a chain of perturbations; every one keeps each sample's top-1 class.
perturb_levels:
  1:
    - {kind: noise, sigma: 0.1}
    - {kind: rounding, decimals: 2}
  2:
    - {kind: reverse_sigmoid, beta: 0.6, gamma: 0.4}
    - {kind: top_k, k: 3}
    - {kind: rounding, decimals: 2}
  3:
    - {kind: label_only}

deceive: {mode: permutation}

throttle: {rate_per_s: 1.0, burst: 5, mode: reject, max_delay_s: 1.0}

failure: {detect: closed, monitors: closed, perturb: closed, audit: closed}
"""
