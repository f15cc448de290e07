"""The gateway's configuration: one typed tree, loaded from YAML once.

Every section is a frozen dataclass. Loading rejects unknown keys and wrong
types with an error that names the path (``upstream.channels: must be >= 1``),
so a typo never silently falls back to a default. Nothing here is evaluated:
YAML is read with ``yaml.safe_load`` and values are checked against the types
declared below.

Minimal YAML::

    listen: 0.0.0.0:8500
    upstream:
      target: 127.0.0.1:8501
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.audit import AuditConfig
from gateway.control import ControlConfig
from gateway.errors import ConfigError
from gateway.policy import PolicyConfig

MIB = 1024 * 1024


@dataclass(frozen=True)
class TlsServerConfig:
    """TLS on the listening side; mTLS when ``client_ca_file`` is set."""

    cert_file: str
    key_file: str
    # PEM bundle of CAs whose client certificates are accepted.
    client_ca_file: str | None = None
    # With a client CA: refuse clients that present no certificate.
    require_client_cert: bool = True


@dataclass(frozen=True)
class TlsClientConfig:
    """TLS towards the upstream model server."""

    ca_file: str | None = None
    # Client certificate for mTLS to the upstream.
    cert_file: str | None = None
    key_file: str | None = None
    # Expected name in the upstream's certificate, when it differs from the target host.
    server_name: str | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    # host:port of the TF Serving gRPC endpoint (in a sidecar: 127.0.0.1:8500 of the pod).
    target: str = "127.0.0.1:8501"
    # Requests are spread round-robin over this many HTTP/2 connections.
    channels: int = 2
    tls: TlsClientConfig | None = None
    # How often the health service re-checks that the upstream is reachable.
    health_probe_interval_s: float = 1.0

    def validate(self, path: str) -> None:
        _require(":" in self.target, f"{path}.target", "must be host:port")
        _require(1 <= self.channels <= 64, f"{path}.channels", "must be between 1 and 64")
        _require(self.health_probe_interval_s > 0, f"{path}.health_probe_interval_s", "must be > 0")


@dataclass(frozen=True)
class LimitsConfig:
    # Largest request or response, both directions. TF Serving accepts up to
    # INT32_MAX; Python gRPC's default of 4 MiB is far too small for tensors.
    max_message_bytes: int = 64 * MIB
    # Largest element count of one decoded tensor: guards memory, where the
    # message size cannot (a shape can claim more than the bytes carry).
    max_tensor_elements: int = 16 * MIB

    def validate(self, path: str) -> None:
        _require(
            4096 <= self.max_message_bytes <= 2**31 - 1,
            f"{path}.max_message_bytes",
            "must be between 4096 and 2147483647",
        )
        _require(self.max_tensor_elements >= 1, f"{path}.max_tensor_elements", "must be >= 1")


@dataclass(frozen=True)
class KeepaliveConfig:
    # Ping an idle connection after this long, and drop it if the ping is not
    # answered within timeout_s. 0 disables pings.
    time_s: float = 30.0
    timeout_s: float = 10.0
    # Shortest ping interval a client may use before the server sends GOAWAY.
    min_client_ping_interval_s: float = 10.0


@dataclass(frozen=True)
class IdentityConfig:
    """Where a client's id comes from, tried in order (see gateway/identity.py)."""

    # Any of: mtls, metadata, peer.
    order: tuple[Literal["mtls", "metadata", "peer"], ...] = ("mtls", "metadata", "peer")
    # Metadata key carrying an API key; the key is only ever kept as a keyed hash.
    metadata_key: str = "x-api-key"
    # Secret for hashing API keys; from an environment variable so it never sits in the file.
    hash_salt_env: str = "TFSHIELD_ID_SALT"
    # Peers (CIDRs) whose forwarded-for metadata is believed: a load balancer or
    # ingress in front of the gateway. From anyone else the header is ignored.
    trusted_proxies: tuple[str, ...] = ()
    forwarded_for_key: str = "x-forwarded-for"
    # A caller none of the sources identifies: served as "anonymous", or refused (UNAUTHENTICATED).
    anonymous: Literal["allow", "refuse"] = "allow"

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{prefix}trusted_proxies.{i}: not an IP network: {cidr!r}") from None


@dataclass(frozen=True)
class ProtectedModelConfig:
    """Input-anomaly detection for one model (see gateway/detect.py)."""

    # model_spec.name of the protected model.
    model: str
    # Folder written by `tfshield calibrate`: manifest.json and one folder per detector.
    artefacts: str
    # What a flag does, by detector name: "record" (count it) or "block"
    # (refuse with PERMISSION_DENIED). Detectors not named here record.
    actions: dict[str, Literal["record", "block"]] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectionConfig:
    models: tuple[ProtectedModelConfig, ...] = ()
    # Samples from concurrent requests are scored together: a batch is flushed
    # at this many samples, or when its oldest sample has waited this long.
    max_batch_size: int = 64
    max_batch_delay_s: float = 0.001
    # Samples waiting to be scored, at most; beyond it the failure mode applies.
    max_queue_samples: int = 4096
    # Batches this small are scored on the event loop, larger ones in the
    # scoring thread (0 = always the thread). The hand-off cost 0.6-1 ms of p50
    # at batch 32, concurrency 1 in the gateway on a busy 2-core machine (waking
    # a thread that competes for the GIL and a core), more than scoring 32 MNIST
    # samples (validation + Mahalanobis, ~170 µs). The price: the event loop
    # does nothing else for that long; larger batches, which only gather under
    # concurrency, go to the thread. Lower it for costlier detectors or inputs.
    inline_max_samples: int = 32
    # When scoring cannot happen (queue full, a detector raised): "closed"
    # refuses the request, "open" forwards it unscored. Both are counted.
    failure_mode: Literal["open", "closed"] = "closed"

    def validate(self, path: str) -> None:
        _require(self.max_batch_size >= 1, f"{path}.max_batch_size", "must be >= 1")
        _require(self.inline_max_samples >= 0, f"{path}.inline_max_samples", "must be >= 0")
        _require(0 <= self.max_batch_delay_s <= 1, f"{path}.max_batch_delay_s", "must be between 0 and 1")
        _require(
            self.max_queue_samples >= self.max_batch_size,
            f"{path}.max_queue_samples",
            "must be >= max_batch_size",
        )
        models = [m.model for m in self.models]
        _require(len(set(models)) == len(models), f"{path}.models", "names a model twice")


@dataclass(frozen=True)
class MonitoredModelConfig:
    # model_spec.name of the monitored model.
    model: str
    # Folder written by `tfshield calibrate --monitors-out`:
    # monitors.json, embedding/, one folder per monitor.
    suite: str
    # The request input the monitors read, and the response output whose argmax is the predicted class.
    input: str = "images"
    output: str = "probabilities"


@dataclass(frozen=True)
class StoreConfig:
    backend: Literal["memory", "redis"] = "memory"
    # redis://host:port/db, rediss:// for TLS, or unix:///path/to/redis.sock.
    url: str = ""
    # Redis password from this environment variable (a Secret), never from the
    # config file; empty: no password, or one given in the url.
    password_env: str = ""
    # Per operation; a store slower than this counts as failed.
    timeout_s: float = 0.05
    # Memory backend: most keys kept (least recently used go first).
    max_keys: int = 2_000_000

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        needs_url = self.backend == "redis"
        _require(not needs_url or bool(self.url), f"{prefix}url", "is required for the redis backend")
        _require(self.timeout_s > 0, f"{prefix}timeout_s", "must be > 0")
        _require(self.max_keys >= 1000, f"{prefix}max_keys", "must be >= 1000")


@dataclass(frozen=True)
class MonitorsConfig:
    models: tuple[MonitoredModelConfig, ...] = ()
    store: StoreConfig = field(default_factory=StoreConfig)
    # Client risk: seconds for a risk to halve, and how one query's monitor risks combine.
    risk_half_life_s: float = 600.0
    risk_combine: Literal["max", "noisy_or"] = "max"
    # Blacklight's secret salt, from this environment variable (replicas must share it).
    fingerprint_salt_env: str = "TFSHIELD_FINGERPRINT_SALT"
    # When the store fails: "closed" refuses (UNAVAILABLE), "open" serves unmonitored.
    failure_mode: Literal["open", "closed"] = "open"

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        _require(self.risk_half_life_s > 0, f"{prefix}risk_half_life_s", "must be > 0")
        models = [m.model for m in self.models]
        _require(len(set(models)) == len(models), f"{prefix}models", "names a model twice")


@dataclass(frozen=True)
class MetricsConfig:
    # host:port of the Prometheus /metrics endpoint; port 0 = ephemeral. Empty disables it.
    listen: str = "127.0.0.1:9100"
    # Distinct model names kept as label values; later names count as "_other",
    # so clients cannot blow up the series count with made-up model names.
    max_model_labels: int = 64


@dataclass(frozen=True)
class GatewayConfig:
    # host:port the gRPC server listens on; port 0 = ephemeral.
    listen: str = "127.0.0.1:8500"
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    tls: TlsServerConfig | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    monitors: MonitorsConfig = field(default_factory=MonitorsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    # ModelService/HandleReloadConfigRequest unloads every model left out of
    # the new config: refused (PERMISSION_DENIED) unless this is true.
    allow_reload_config: bool = False
    # On SIGTERM, in-flight calls get this long to finish before they are cancelled.
    shutdown_grace_s: float = 10.0
    # The asyncio event loop `tfshield serve` runs on: "uvloop" (the `fast` extra; required),
    # "asyncio" (the standard library's), or "auto": uvloop when it is installed.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    def validate(self, path: str) -> None:
        _require(":" in self.listen, f"{path}listen", "must be host:port")
        _require(self.shutdown_grace_s >= 0, f"{path}shutdown_grace_s", "must be >= 0")


def _require(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {problem}")


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn plain YAML data into the declared type ``tp``, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _build(inner, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, allowed))}, not {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping")
        key_type, item_type = typing.get_args(tp)
        return {_build(key_type, k, path): _build(item_type, v, _join(path, k)) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: must be a list")
        (item_type, _) = typing.get_args(tp)
        return tuple(_build(item_type, v, _join(path, i)) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: must be a mapping, not {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"{_join(path, unknown[0])}: unknown key; known keys here: {', '.join(sorted(known))}"
            )
        for f in dataclasses.fields(tp):
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default and f.name not in value:
                raise ConfigError(f"{_join(path, f.name)}: required key is missing")
        kwargs = {k: _build(hints[k], v, _join(path, k)) for k, v in value.items()}
        obj = tp(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate(path if path else "")
        return obj
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number, not {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: must be {tp.__name__}, not {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # a bug in this module


def config_from_dict(data: dict[str, Any] | None) -> GatewayConfig:
    """Build and validate a GatewayConfig from plain data (parsed YAML)."""
    return _build(GatewayConfig, data or {}, "")


def load_config(path: str | Path) -> GatewayConfig:
    """Read a YAML file into a GatewayConfig; errors name the file and the key."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_overrides(config: GatewayConfig, **changes: Any) -> GatewayConfig:
    """A copy of ``config`` with top-level fields replaced (command-line flags)."""
    return dataclasses.replace(config, **changes)
