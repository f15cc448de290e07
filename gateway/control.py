"""The control API (``protos/control.proto``): clients' risk and the policy, on their own port.

Served by grpc.aio with generic handlers for ``/tfshield.control.v1.Control/<Method>``:

``GetClient``      a client's risk (and whatever else the risk source can tell)
``ListClients``    the riskiest clients, highest first (``limit`` 0 means 20, at most 1000)
``ResetClient``    forget a client's monitor state (its risk starts over)
``GetPolicy``      the policy in force: its YAML, SHA-256 and load time
``ReloadPolicy``   validate new policy YAML (or re-read the policy file when
                   empty) and swap it in atomically; a bad policy is refused
                   with INVALID_ARGUMENT naming the key, and the old one stays

It never runs unauthenticated: a bearer token (``authorization: Bearer
<token>`` metadata; the token read once from ``token_file`` or the environment
variable named by ``token_env``, at least 16 characters, compared in constant
time and never logged), or mTLS (``tls.client_ca_file``: only clients with a
certificate from that CA connect), or both. Without valid credentials every
method answers UNAUTHENTICATED.

A policy reloaded from text through the API lives in memory only: the next
SIGHUP (or empty ReloadPolicy) re-reads the file. :func:`install_sighup_reload`
makes SIGHUP reload the policy file.

Stats: ``tfshield_control_auth_failures_total``; reloads are counted by the
:class:`~gateway.policy.PolicyHolder` (``tfshield_policy_reloads_total{outcome}``).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter

from gateway.errors import ConfigError
from gateway.policy import PolicyError, PolicyHolder
from protos import control_pb2

log = logging.getLogger(__name__)

SERVICE = "tfshield.control.v1.Control"
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000
MIN_TOKEN_CHARS = 16
UNAUTHENTICATED_MESSAGE = (
    "the control API needs 'authorization: Bearer <token>' metadata with the right token"
)


def _require(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {problem}")


@dataclass(frozen=True)
class ControlTlsConfig:
    """TLS on the control port (its own: operators' certificates, not clients')."""

    cert_file: str
    key_file: str
    # PEM bundle of CAs whose client certificates are accepted: mTLS.
    client_ca_file: str | None = None
    require_client_cert: bool = True


@dataclass(frozen=True)
class ControlConfig:
    """``control:`` in the gateway config."""

    # host:port of the control API; port 0 = ephemeral; empty disables it.
    listen: str = ""
    # Bearer token: read from this file (first line), or from the environment variable named here.
    token_file: str | None = None
    token_env: str | None = None
    # TLS for the control port; with client_ca_file, clients need a certificate from that CA (mTLS).
    tls: ControlTlsConfig | None = None

    @property
    def mtls(self) -> bool:
        return self.tls is not None and bool(self.tls.client_ca_file) and self.tls.require_client_cert

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        if not self.listen:
            return
        _require(":" in self.listen, f"{prefix}listen", "must be host:port")
        _require(
            bool(self.token_file or self.token_env or self.mtls),
            f"{prefix}listen",
            "the control API needs authentication: set token_file, token_env, or tls with client_ca_file",
        )

    def token(self, path: str = "control") -> bytes | None:
        """The bearer token, or None when only mTLS is configured. Errors never contain the token."""
        if self.token_file:
            try:
                text = Path(self.token_file).read_text()
            except OSError as exc:
                raise ConfigError(
                    f"{path}.token_file: cannot read {self.token_file}: {exc.strerror}"
                ) from None
            token = text.splitlines()[0].strip() if text.strip() else ""
            where = f"{path}.token_file"
        elif self.token_env:
            token = os.environ.get(self.token_env, "").strip()
            where = f"{path}.token_env"
            if not token:
                raise ConfigError(f"{where}: the environment variable {self.token_env} is not set")
        else:
            return None
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} characters")
        return token.encode()


class ClientRiskLike(Protocol):
    """detectors.risk.ClientRisk: each method may be sync or async."""

    def get(self, store: Any, client: str, now: float) -> Any: ...

    def top(self, store: Any, limit: int, min_risk: float) -> Any: ...

    def reset(self, store: Any, client: str) -> Any: ...


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _credentials(tls: ControlTlsConfig) -> grpc.ServerCredentials:
    key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None and tls.require_client_cert,
    )


class ControlService:
    """The methods, auth and metrics; transport-free so it can be mounted on any grpc.aio server."""

    def __init__(
        self,
        holder: PolicyHolder,
        risk: ClientRiskLike | None,
        store: Any,
        registry: CollectorRegistry,
        token: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.risk = risk
        self.store = store
        self._token = token
        self._clock = clock
        self.auth_failures = Counter(
            "tfshield_control_auth_failures",
            "Control API calls refused as unauthenticated.",
            registry=registry,
        )

    def handler(self) -> grpc.GenericRpcHandler:
        pb = control_pb2
        methods: dict[str, tuple[Callable[..., Awaitable[Any]], Any]] = {
            "GetClient": (self.get_client, pb.GetClientRequest),
            "ListClients": (self.list_clients, pb.ListClientsRequest),
            "ResetClient": (self.reset_client, pb.ResetClientRequest),
            "GetPolicy": (self.get_policy, pb.GetPolicyRequest),
            "ReloadPolicy": (self.reload_policy, pb.ReloadPolicyRequest),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._authenticated(method),
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, (method, request_type) in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _authenticated(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not self._authorized(context):
                self.auth_failures.inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            return await method(request, context)

        return call

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self._token is None:
            return True  # mTLS only: the handshake already refused clients without a certificate
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                raw = value if isinstance(value, str) else value.decode("latin-1")
                scheme, _, token = raw.strip().partition(" ")
                if scheme.lower() == "bearer":
                    presented = token.strip().encode("utf-8", "replace")
                break
        # Constant time in the content (only a length mismatch shows).
        return bool(presented) and hmac.compare_digest(presented, self._token)

    # -- methods ---------------------------------------------------------------------------------

    async def _require_monitors(self, context: grpc.aio.ServicerContext) -> None:
        if self.risk is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this gateway tracks no client risk: configure monitors.models to use the client methods",
            )

    async def _client_state(self, client_id: str) -> control_pb2.ClientState:
        now = self._clock()
        state = control_pb2.ClientState(client_id=client_id)
        state.risk = float(await _maybe_await(self.risk.get(self.store, client_id, now)))
        describe = getattr(self.risk, "describe", None)
        if describe is not None:
            info = await _maybe_await(describe(self.store, client_id, now))
            if info:
                _fill_state(state, info)
        return state

    async def get_client(
        self, request: control_pb2.GetClientRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ClientState:
        await self._require_monitors(context)
        if not request.client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id is empty")
        return await self._client_state(request.client_id)

    async def list_clients(
        self, request: control_pb2.ListClientsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListClientsResponse:
        await self._require_monitors(context)
        limit = min(request.limit or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
        if not 0.0 <= request.min_risk <= 1.0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_risk must be between 0 and 1")
        rows = await _maybe_await(self.risk.top(self.store, limit, request.min_risk))
        response = control_pb2.ListClientsResponse()
        for row in rows:
            if isinstance(row, tuple):
                client_id, risk = row[0], row[1]
            else:
                client_id, risk = row.client_id, row.risk
            response.clients.add(client_id=client_id, risk=float(risk))
        return response

    async def reset_client(
        self, request: control_pb2.ResetClientRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ResetClientResponse:
        await self._require_monitors(context)
        if not request.client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id is empty")
        existed = await _maybe_await(self.risk.reset(self.store, request.client_id))
        log.info("control: client %s reset", request.client_id)
        return control_pb2.ResetClientResponse(existed=bool(existed))

    def _document(self) -> control_pb2.PolicyDocument:
        policy = self.holder.current
        return control_pb2.PolicyDocument(
            yaml=policy.text, sha256=policy.sha256, loaded_unix_s=policy.loaded_unix_s
        )

    async def get_policy(
        self, request: control_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.PolicyDocument:
        return self._document()

    async def reload_policy(
        self, request: control_pb2.ReloadPolicyRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ReloadPolicyResponse:
        text = request.yaml or None
        try:
            # Parsing and file reading off the event loop; the swap itself is one assignment.
            await asyncio.to_thread(self.holder.reload, text)
        except PolicyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"policy refused, the old one stays: {exc}")
        return control_pb2.ReloadPolicyResponse(policy=self._document())


def _fill_state(state: control_pb2.ClientState, info: Any) -> None:
    get = info.get if isinstance(info, dict) else lambda name, default=None: getattr(info, name, default)
    for name, value in (get("monitor_risk") or {}).items():
        state.monitor_risk[name] = float(value)
    for name in ("queries", "flags"):
        value = get(name)
        if value is not None:
            setattr(state, name, int(value))
    for name in ("first_seen_unix_s", "last_seen_unix_s"):
        value = get(name)
        if value is not None:
            setattr(state, name, float(value))


async def create_control_server(
    config: ControlConfig,
    policy_holder: PolicyHolder,
    risk: ClientRiskLike | None,
    store: Any,
    registry: CollectorRegistry,
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start the control API server; returns it and its port.

    Stop it with ``await server.stop(grace)``. Raises ConfigError when the
    config has no authentication, the token cannot be read, or the address
    cannot be bound.
    """
    config.validate("control")
    if not config.listen:
        raise ConfigError("control.listen: is empty; the control API is disabled")
    service = ControlService(policy_holder, risk, store, registry, config.token("control"))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    if config.tls is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, _credentials(config.tls))
    if port == 0:
        raise ConfigError(f"control.listen: cannot bind {config.listen}")
    await server.start()
    if config.tls is None and not _loopback(config.listen):
        log.warning(
            "control API on %s without TLS: its bearer token crosses the network in clear; set control.tls",
            config.listen,
        )
    return server, port


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost")


def install_sighup_reload(holder: PolicyHolder, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Make SIGHUP reload the policy file (validated first; a bad file is logged and the old policy stays)."""
    loop = loop or asyncio.get_running_loop()

    def reload() -> None:
        try:
            holder.reload()
        except PolicyError:
            pass  # logged and counted by the holder

    loop.add_signal_handler(signal.SIGHUP, reload)
